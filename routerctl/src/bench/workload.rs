//! The requests `routerctl bench` sends: `shared-prefix` (G groups of a long system prompt, Q
//! questions each, in random order) and `multi-turn` (N conversations whose every turn resends
//! the whole history, so a turn can only start once the previous one answered).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    SharedPrefix,
    MultiTurn,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Job {
    /// The group or conversation: what perfect affinity hashes to pick a worker.
    pub key: usize,
    pub path: &'static str,
    pub body: Value,
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

impl Workload {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        groups: usize,
        per_group: usize,
        system_chars: usize,
        question_chars: usize,
        max_tokens: u32,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        match kind {
            Kind::SharedPrefix => {
                let systems: Vec<String> = (0..groups)
                    .map(|g| text(&mut rng, system_chars, &format!("System prompt {g}")))
                    .collect();
                let mut queue = Vec::with_capacity(groups * per_group);
                for (g, sys) in systems.iter().enumerate() {
                    for q in 0..per_group {
                        let question = text(&mut rng, question_chars, &format!("Question {q}"));
                        let body = json!({"text": format!("{sys}\n{question}"), "stream": true,
                                          "sampling_params": {"max_new_tokens": max_tokens}});
                        queue.push(Job { key: g, path: "/generate", body });
                    }
                }
                queue.shuffle(&mut rng);
                Self { kind, queue, conversations: Vec::new(), max_tokens }
            }
            Kind::MultiTurn => {
                let conversations = (0..groups)
                    .map(|c| Conversation {
                        messages: vec![json!({"role": "system", "content": text(&mut rng, system_chars, &format!("Conversation {c}"))})],
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
            Kind::SharedPrefix => self.queue.len(),
            Kind::MultiTurn => self.conversations.iter().map(|c| c.questions.len()).sum(),
        }
    }

    /// The next request that can start now; `None` when all are sent or, for multi-turn, when
    /// every unfinished conversation waits for an answer.
    pub fn next(&mut self, rng: &mut StdRng) -> Option<Job> {
        match self.kind {
            Kind::SharedPrefix => self.queue.pop(),
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
                Some(Job { key: i, path: "/v1/chat/completions", body })
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

    pub fn finished(&self) -> bool {
        match self.kind {
            Kind::SharedPrefix => self.queue.is_empty(),
            Kind::MultiTurn => self.conversations.iter().all(|c| c.next_turn == c.questions.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_has_every_question_once() {
        let mut w = Workload::new(Kind::SharedPrefix, 3, 4, 100, 20, 8, 1);
        let mut rng = StdRng::seed_from_u64(0);
        let mut n = 0;
        while let Some(j) = w.next(&mut rng) {
            assert!(j.body["text"]
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
        let mut w = Workload::new(Kind::MultiTurn, 1, 3, 50, 10, 8, 1);
        let mut rng = StdRng::seed_from_u64(0);
        let j = w.next(&mut rng).unwrap();
        assert!(w.next(&mut rng).is_none(), "turn 2 must wait for turn 1");
        w.complete(&j, "answer one");
        let j2 = w.next(&mut rng).unwrap();
        let msgs = j2.body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[2]["content"], "answer one");
        w.complete(&j2, "two");
        let j3 = w.next(&mut rng).unwrap();
        w.complete(&j3, "three");
        assert!(w.finished());
        assert_eq!(w.total(), 3);
    }
}
