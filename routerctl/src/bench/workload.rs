//! The requests `routerctl bench` sends: `shared-prefix` (G groups of a long system prompt, Q
//! questions each, in random order), `zipf` (the same groups, but each request's group drawn
//! with Zipf-skewed popularity, so a few prefixes are hot) and `multi-turn` (N conversations
//! whose every turn resends the whole history, so a turn can only start once the previous one
//! answered; optionally all opening with the same shared system prompt).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    SharedPrefix,
    MultiTurn,
    Zipf,
}

/// The shape of a workload.
#[derive(Debug, Clone)]
pub struct Shape {
    pub kind: Kind,
    /// Groups (shared-prefix, zipf) or conversations (multi-turn).
    pub groups: usize,
    /// Questions per group, or turns per conversation; zipf sends groups x this many requests.
    pub per_group: usize,
    pub system_chars: usize,
    pub question_chars: usize,
    /// multi-turn: characters of a system prompt every conversation opens with, before its own.
    pub shared_system_chars: usize,
    /// zipf: the exponent (group k is drawn with weight 1 / k^s).
    pub zipf_s: f64,
    pub max_tokens: u32,
    pub seed: u64,
    /// shared-prefix, zipf: send each prompt as `input_ids` (its UTF-8 bytes) instead of text.
    pub input_ids: bool,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Job {
    /// The group or conversation: what perfect affinity hashes to pick a worker.
    pub key: usize,
    pub path: &'static str,
    /// The JSON body, serialized once when the job is made: sent as is (again to another
    /// router when the first refused it), and smaller than a `Value` of thousands of ids.
    pub raw: bytes::Bytes,
}

impl Job {
    pub fn new(key: usize, path: &'static str, body: &Value) -> Self {
        let raw = serde_json::to_vec(body).expect("a Value serializes").into();
        Self { key, path, raw }
    }

    /// The body, parsed again (to check the answer, in tests).
    pub fn body(&self) -> Value {
        serde_json::from_slice(&self.raw).expect("serialized from a Value")
    }
}

pub struct Workload {
    kind: Kind,
    queue: Vec<Job>,
    conversations: Vec<Conversation>,
    max_tokens: u32,
}

struct Conversation {
    messages: Vec<Value>,
    questions: Vec<String>,
    next_turn: usize,
    in_flight: bool,
}

fn text(rng: &mut StdRng, chars: usize, label: &str) -> String {
    const WORDS: &[&str] = &[
        "router", "cache", "prefix", "token", "worker", "batch", "stream", "model", "latency",
        "memory", "fleet", "request", "answer", "context", "kernel", "tensor",
    ];
    let mut s = format!("{label}: ");
    while s.len() < chars {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        s.push(' ');
    }
    s.truncate(chars.max(label.len()));
    s
}

/// Group indices `0..groups` drawn `n` times, group k with weight 1 / (k+1)^s.
fn zipf_draws(rng: &mut StdRng, groups: usize, n: usize, s: f64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=groups).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(groups);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cumulative.push(acc);
    }
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            cumulative.partition_point(|c| *c < u).min(groups - 1)
        })
        .collect()
}

impl Workload {
    pub fn new(shape: &Shape) -> Self {
        let Shape {
            kind,
            groups,
            per_group,
            system_chars,
            question_chars,
            max_tokens,
            input_ids,
            ..
        } = *shape;
        let mut rng = StdRng::seed_from_u64(shape.seed);
        let question = |rng: &mut StdRng, q: usize, sys: &str| {
            let question = text(rng, question_chars, &format!("Question {q}"));
            let prompt = format!("{sys}\n{question}");
            let mut body =
                json!({"stream": true, "sampling_params": {"max_new_tokens": max_tokens}});
            if input_ids {
                body["input_ids"] = json!(prompt.as_bytes());
            } else {
                body["text"] = json!(prompt);
            }
            body
        };
        match kind {
            Kind::SharedPrefix | Kind::Zipf => {
                let systems: Vec<String> = (0..groups)
                    .map(|g| text(&mut rng, system_chars, &format!("System prompt {g}")))
                    .collect();
                let mut queue = Vec::with_capacity(groups * per_group);
                if kind == Kind::Zipf {
                    let draws = zipf_draws(&mut rng, groups, groups * per_group, shape.zipf_s);
                    for (q, g) in draws.into_iter().enumerate() {
                        let body = question(&mut rng, q, &systems[g]);
                        queue.push(Job::new(g, "/generate", &body));
                    }
                } else {
                    for (g, sys) in systems.iter().enumerate() {
                        for q in 0..per_group {
                            let body = question(&mut rng, q, sys);
                            queue.push(Job::new(g, "/generate", &body));
                        }
                    }
                    queue.shuffle(&mut rng);
                }
                Self { kind, queue, conversations: Vec::new(), max_tokens }
            }
            Kind::MultiTurn => {
                let shared = text(&mut rng, shape.shared_system_chars, "Shared system prompt");
                let shared =
                    if shape.shared_system_chars == 0 { String::new() } else { shared + "\n" };
                let conversations = (0..groups)
                    .map(|c| Conversation {
                        messages: vec![json!({"role": "system", "content": format!("{shared}{}", text(&mut rng, system_chars, &format!("Conversation {c}")))})],
                        questions: (0..per_group).map(|t| text(&mut rng, question_chars, &format!("Turn {t}"))).collect(),
                        next_turn: 0,
                        in_flight: false,
                    })
                    .collect();
                Self { kind, queue: Vec::new(), conversations, max_tokens }
            }
        }
    }

    pub fn total(&self) -> usize {
        match self.kind {
            Kind::SharedPrefix | Kind::Zipf => self.queue.len(),
            Kind::MultiTurn => self.conversations.iter().map(|c| c.questions.len()).sum(),
        }
    }

    /// The next request that can start now; `None` when all are sent or, for multi-turn, when
    /// every unfinished conversation waits for an answer.
    pub fn next(&mut self, rng: &mut StdRng) -> Option<Job> {
        match self.kind {
            Kind::SharedPrefix | Kind::Zipf => self.queue.pop(),
            Kind::MultiTurn => {
                let ready: Vec<usize> = (0..self.conversations.len())
                    .filter(|&i| {
                        let c = &self.conversations[i];
                        !c.in_flight && c.next_turn < c.questions.len()
                    })
                    .collect();
                let i = *ready.get(rng.random_range(0..ready.len().max(1)))?;
                let c = &mut self.conversations[i];
                c.in_flight = true;
                c.messages.push(json!({"role": "user", "content": c.questions[c.next_turn]}));
                let body = json!({"messages": c.messages, "max_tokens": self.max_tokens, "stream": true,
                                  "stream_options": {"include_usage": true}});
                Some(Job::new(i, "/v1/chat/completions", &body))
            }
        }
    }

    /// Records a finished request (for multi-turn, the answer joins the history).
    pub fn complete(&mut self, job: &Job, answer: &str) {
        if self.kind == Kind::MultiTurn {
            let c = &mut self.conversations[job.key];
            c.messages.push(json!({"role": "assistant", "content": answer}));
            c.next_turn += 1;
            c.in_flight = false;
        }
    }

    /// Takes the first `n` requests this workload would send as a workload of their own (to
    /// warm the caches and routers before the rest is measured); `None` for multi-turn, whose
    /// turns wait on each other's answers.
    pub fn split_warmup(&mut self, n: usize) -> Option<Self> {
        if self.kind == Kind::MultiTurn {
            return None;
        }
        // Requests are sent from the end of the queue.
        let queue = self.queue.split_off(self.queue.len().saturating_sub(n));
        Some(Self {
            kind: self.kind,
            queue,
            conversations: Vec::new(),
            max_tokens: self.max_tokens,
        })
    }

    pub fn finished(&self) -> bool {
        match self.kind {
            Kind::SharedPrefix | Kind::Zipf => self.queue.is_empty(),
            Kind::MultiTurn => self.conversations.iter().all(|c| c.next_turn == c.questions.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kind: Kind, groups: usize, per_group: usize, system: usize, q: usize) -> Shape {
        Shape {
            kind,
            groups,
            per_group,
            system_chars: system,
            question_chars: q,
            shared_system_chars: 0,
            zipf_s: 1.1,
            max_tokens: 8,
            seed: 1,
            input_ids: false,
        }
    }

    #[test]
    fn input_ids_are_the_prompts_bytes() {
        let mut s = shape(Kind::SharedPrefix, 1, 1, 40, 10);
        s.input_ids = true;
        let mut w = Workload::new(&s);
        let mut rng = StdRng::seed_from_u64(0);
        let job = w.next(&mut rng).unwrap();
        let ids: Vec<u8> = serde_json::from_value(job.body()["input_ids"].clone()).unwrap();
        assert!(String::from_utf8(ids).unwrap().starts_with("System prompt 0"));
        assert!(job.body().get("text").is_none());
    }

    #[test]
    fn zipf_makes_a_few_groups_hot() {
        let mut w = Workload::new(&shape(Kind::Zipf, 32, 20, 60, 10));
        let mut rng = StdRng::seed_from_u64(0);
        let mut per_group = vec![0usize; 32];
        while let Some(j) = w.next(&mut rng) {
            assert!(j.body()["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("System prompt {}", j.key)));
            per_group[j.key] += 1;
        }
        assert_eq!(per_group.iter().sum::<usize>(), 640);
        // Weights 1/k^1.1 over 32 groups: the first group takes ~30%, the last ~0.7%.
        assert!(per_group[0] > 150 && per_group[0] < 240, "{per_group:?}");
        assert!(per_group[0] > 5 * per_group[31], "{per_group:?}");
    }

    #[test]
    fn multi_turn_can_share_one_system_prompt() {
        let mut s = shape(Kind::MultiTurn, 3, 1, 40, 10);
        s.shared_system_chars = 200;
        let mut w = Workload::new(&s);
        let mut rng = StdRng::seed_from_u64(0);
        let mut firsts = Vec::new();
        while let Some(j) = w.next(&mut rng) {
            firsts.push(j.body()["messages"][0]["content"].as_str().unwrap().to_owned());
            w.complete(&j, "ok");
        }
        assert_eq!(firsts.len(), 3);
        assert!(firsts
            .iter()
            .all(|f| f.starts_with("Shared system prompt") && f[..200] == firsts[0][..200]));
        assert!(firsts[0] != firsts[1], "each conversation has its own part too");
    }

    #[test]
    fn shared_prefix_has_every_question_once() {
        let mut w = Workload::new(&shape(Kind::SharedPrefix, 3, 4, 100, 20));
        let mut rng = StdRng::seed_from_u64(0);
        let mut n = 0;
        while let Some(j) = w.next(&mut rng) {
            assert!(j.body()["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("System prompt {}", j.key)));
            n += 1;
        }
        assert_eq!(n, 12);
        assert!(w.finished());
    }

    #[test]
    fn multi_turn_waits_for_answers_and_grows_history() {
        let mut w = Workload::new(&shape(Kind::MultiTurn, 1, 3, 50, 10));
        let mut rng = StdRng::seed_from_u64(0);
        let j = w.next(&mut rng).unwrap();
        assert!(w.next(&mut rng).is_none(), "turn 2 must wait for turn 1");
        w.complete(&j, "answer one");
        let j2 = w.next(&mut rng).unwrap();
        let body = j2.body();
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[2]["content"], "answer one");
        w.complete(&j2, "two");
        let j3 = w.next(&mut rng).unwrap();
        w.complete(&j3, "three");
        assert!(w.finished());
        assert_eq!(w.total(), 3);
    }
}
