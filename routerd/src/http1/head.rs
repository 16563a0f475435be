//! Request heads as they arrive on a client connection: parsed with `httparse`, checked for
//! the framing rules that keep a proxy safe from request smuggling (one body length, chunked
//! only as the last coding, never both), and limited in size and header count.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 100;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub struct Head {
    pub method: Method,
    /// The request target as sent (origin form: path and query).
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: BodyLen,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl Head {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Why a head was refused; the connection is answered with `status` and closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HeadError {
    pub status: StatusCode,
    pub message: String,
}

fn bad(message: impl Into<String>) -> HeadError {
    HeadError { status: StatusCode::BAD_REQUEST, message: message.into() }
}

fn too_large(message: &str) -> HeadError {
    HeadError { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, message: message.into() }
}

/// Parses a complete head at the start of `buf`: `Ok(None)` while more bytes are needed,
/// else the head and its length in bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(too_large("the request head is larger than 64 KiB"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(too_large("the request has more than 100 headers"))
        }
        Err(e) => return Err(bad(format!("malformed HTTP request: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(too_large("the request head is larger than 64 KiB"));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("invalid method"))?;
    let target = origin_form(req.path.unwrap_or(""), &method)?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }
    let body = body_len(&headers, version)?;
    let keep_alive = keep_alive(&headers, version);
    let expect_continue = match headers.get(header::EXPECT) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => {
            return Err(HeadError {
                status: StatusCode::EXPECTATION_FAILED,
                message: "only `Expect: 100-continue` is supported".into(),
            })
        }
    };
    let head = Head { method, target, version, headers, body, keep_alive, expect_continue };
    Ok(Some((head, len)))
}

/// The target as a path and query. Origin form (`/generate?x`) as it is; absolute form
/// (`http://host:port/generate?x`), which a server must accept (RFC 9112 §3.2.2), without its
/// scheme and authority; `*` for `OPTIONS`. Anything else (authority form is for CONNECT) is 400.
fn origin_form(target: &str, method: &Method) -> Result<String, HeadError> {
    if target.starts_with('/') {
        return Ok(target.to_owned());
    }
    if target == "*" && method == Method::OPTIONS {
        return Ok("/".to_owned());
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return Err(bad("the request target must be a path or an absolute URL"));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("invalid authority in the request target"));
    }
    Ok(match path.strip_prefix('?') {
        Some(_) => format!("/{path}"),
        None if path.is_empty() => "/".to_owned(),
        None => path.to_owned(),
    })
}

fn body_len(headers: &HeaderMap, version: Version) -> Result<BodyLen, HeadError> {
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(bad("both Transfer-Encoding and Content-Length are set"));
        }
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding is not allowed in HTTP/1.0"));
        }
        let codings = te
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        return match codings.as_slice() {
            [c] if c.eq_ignore_ascii_case("chunked") => Ok(BodyLen::Chunked),
            _ => Err(HeadError {
                status: StatusCode::NOT_IMPLEMENTED,
                message: "only `Transfer-Encoding: chunked` is supported".into(),
            }),
        };
    }
    let mut len = None;
    for v in cl {
        for part in v.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) || part.len() > 18 {
                return Err(bad("invalid Content-Length"));
            }
            let n: u64 = part.parse().map_err(|_| bad("invalid Content-Length"))?;
            if len.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length values"));
            }
            len = Some(n);
        }
    }
    Ok(BodyLen::Length(len.unwrap_or(0)))
}

/// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it.
pub fn keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let mut close = false;
    let mut keep = false;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            close |= token.eq_ignore_ascii_case("close");
            keep |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse(raw.as_bytes())
    }

    #[test]
    fn parses_a_post() {
        let raw =
            "POST /generate?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n{\"text\":\"a\"}";
        let (h, n) = head(raw).unwrap().unwrap();
        assert_eq!(
            (&h.method, h.path(), h.body, h.keep_alive),
            (&Method::POST, "/generate", BodyLen::Length(12), true)
        );
        assert_eq!(&raw[n..], "{\"text\":\"a\"}");
        assert!(head("POST /generate HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn framing_rules() {
        let status = |raw: &str| head(raw).err().map(|e| e.status.as_u16());
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            Some(400)
        );
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n"), Some(400));
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(501)
        );
        assert_eq!(status("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), Some(417));
        assert_eq!(status("GET x/ HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status("GET http:///a HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status("CONNECT a:443 HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status("NOT HTTP\r\n\r\n"), Some(400));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert_eq!(status(&many), Some(431));
        let big = format!("GET / HTTP/1.1\r\na: {}", "b".repeat(MAX_HEAD));
        assert_eq!(status(&big), Some(431));
        let (h, _) =
            head("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.body, BodyLen::Chunked);
    }

    #[test]
    fn absolute_form_targets_are_accepted() {
        let target = |raw: &str| head(raw).unwrap().unwrap().0.target;
        assert_eq!(target("POST http://h:1/generate?x=1 HTTP/1.1\r\n\r\n"), "/generate?x=1");
        assert_eq!(target("GET HTTP://h:1 HTTP/1.1\r\n\r\n"), "/");
        assert_eq!(target("GET http://h?a HTTP/1.1\r\n\r\n"), "/?a");
        assert_eq!(target("OPTIONS * HTTP/1.1\r\n\r\n"), "/");
    }

    #[test]
    fn keep_alive_by_version() {
        let ka = |raw: &str| head(raw).unwrap().unwrap().0.keep_alive;
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }
}
