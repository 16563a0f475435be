//! Configuration errors: each names where it comes from (file:line:col, or the flag) and the key
//! path, so an operator can fix every problem of a file in one pass.

use std::fmt;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// `FILE:LINE:COL`, or the flag that set the value.
    pub origin: Option<String>,
    /// Dotted key path, e.g. `workers[1].url`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(o) => write!(f, "{o}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every error found, in file order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Where a value came from, to turn spans into `FILE:LINE:COL`.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn locate(&self, span: &Range<usize>) -> String {
        let (line, col) = line_col(self.text, span.start);
        format!("{}:{line}:{col}", self.name)
    }

    /// The key path at a byte offset: the enclosing `[table]` / `[[array]]` header (arrays
    /// numbered from 0) and the key on that line.
    pub fn key_at(&self, offset: usize) -> String {
        let mut table = String::new();
        let mut counts: Vec<(String, usize)> = Vec::new();
        let mut key = String::new();
        let mut pos = 0;
        for line in self.text.split_inclusive('\n') {
            let start = pos;
            pos += line.len();
            let t = line.trim();
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let name = name.trim().to_owned();
                let n = match counts.iter_mut().find(|(k, _)| *k == name) {
                    Some((_, c)) => {
                        *c += 1;
                        *c
                    }
                    None => {
                        counts.push((name.clone(), 0));
                        0
                    }
                };
                table = format!("{name}[{n}]");
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
                table = name.trim().to_owned();
            }
            if offset < pos {
                if let Some((k, _)) = t.split_once('=') {
                    if !t.starts_with('[') && offset >= start {
                        key = k.trim().trim_matches('"').to_owned();
                    }
                }
                break;
            }
        }
        match (table.is_empty(), key.is_empty()) {
            (true, _) => key,
            (false, true) => table,
            (false, false) => format!("{table}.{key}"),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_and_names_keys() {
        let text = "[server]\nport = 1\n\n[[workers]]\nurl = \"a\"\n[[workers]]\nurl = \"b\"\n";
        let src = Source { name: "f.toml", text };
        let off = text.find("\"b\"").unwrap();
        assert_eq!(src.locate(&(off..off + 1)), "f.toml:7:7");
        assert_eq!(src.key_at(off), "workers[1].url");
        assert_eq!(src.key_at(text.find("1").unwrap()), "server.port");
    }
}
