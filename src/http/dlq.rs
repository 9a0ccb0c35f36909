//! `GET /api/dlq` and `POST /api/dlq/replay`: the dead-letter queue over HTTP.
//!
//! `GET /api/dlq?topic=&kind=&limit=&cursor=` answers `{"entries": [...], "next_cursor": …}`,
//! oldest first (`limit` 1–1000, default 100; `kind` is `publish` or `handler`; pass
//! `next_cursor` back as `cursor` for the next page). `POST /api/dlq/replay` with
//! `{"topic"?, "ids"?, "kind"?}` (an empty body replays everything) answers
//! `{"replayed": n, "failed": n}`.
//!
//! ```no_run
//! # async fn example(engine: wsengine::Engine) {
//! // Both routes are part of the engine's HTTP service, behind the API key like all of /api.
//! let service = engine.http_service();
//! # let _ = service;
//! # }
//! ```

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use wsengine_services::dlq::{DeadLetterFilter, DeadLetterKind, DeadLetterQuery};

use super::{HttpResponse, error, json_response};
use crate::engine::Engine;

/// Largest page `GET /api/dlq` returns.
const MAX_PAGE: usize = 1000;

/// Lists dead letters; `query` is the request's query string.
pub(super) async fn list(engine: &Engine, query: Option<&str>) -> HttpResponse {
    let mut filter = DeadLetterFilter::default();
    let mut page = DeadLetterQuery::new(DeadLetterFilter::default());
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            return error(StatusCode::BAD_REQUEST, format!("{key}: invalid percent-encoding"));
        };
        match key {
            "topic" if !value.is_empty() => filter.topic = Some(value),
            "kind" if !value.is_empty() => match DeadLetterKind::parse(&value) {
                Some(kind) => filter.kind = Some(kind),
                None => return error(StatusCode::BAD_REQUEST, "kind must be publish or handler"),
            },
            "limit" => match value.parse::<usize>() {
                Ok(limit) if (1..=MAX_PAGE).contains(&limit) => page.limit = limit,
                _ => return error(StatusCode::BAD_REQUEST, format!("limit must be between 1 and {MAX_PAGE}")),
            },
            "cursor" if !value.is_empty() => page.after = Some(value),
            "topic" | "kind" | "cursor" => {}
            other => return error(StatusCode::BAD_REQUEST, format!("unknown query parameter {other:?}")),
        }
    }
    page.filter = filter;
    match engine.dead_letters(page).await {
        Ok(page) => json_response(StatusCode::OK, &json!(page)),
        Err(store_error) => error(StatusCode::SERVICE_UNAVAILABLE, store_error),
    }
}

/// The body of `POST /api/dlq/replay`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    kind: Option<String>,
}

/// Replays the dead letters the body selects.
pub(super) async fn replay(engine: &Engine, body: &[u8]) -> HttpResponse {
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
        }
    };
    let kind = match request.kind.as_deref().map(DeadLetterKind::parse) {
        None => None,
        Some(Some(kind)) => Some(kind),
        Some(None) => return error(StatusCode::BAD_REQUEST, "kind must be publish or handler"),
    };
    let filter = DeadLetterFilter { topic: request.topic, kind, ids: request.ids };
    match engine.replay_dead_letters(filter).await {
        Ok(report) => json_response(StatusCode::OK, &json!(report)),
        Err(store_error) => error(StatusCode::SERVICE_UNAVAILABLE, store_error),
    }
}

/// Decodes `%XX` escapes and `+` (a space in query strings); `None` for bad escapes or UTF-8.
pub(super) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("prices.%E2%82%AC").as_deref(), Some("prices.€"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
