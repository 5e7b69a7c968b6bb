//! The three kinds of receiver: how a notice becomes a request, and what the answer
//! means (delivered, try again, or give up).

use std::fmt;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};

use super::message::Message;
use super::sign::SigningKey;
use crate::config::Secret;

/// Where a sink sends, with its credentials.
#[derive(Debug, Clone)]
pub enum Target {
    /// A POST of the Standard Webhooks JSON, signed.
    Webhook { url: SecretUrl, key: SigningKey },
    /// Telegram's Bot API `sendMessage`.
    Telegram {
        api_url: Url,
        token: Secret,
        chat_id: String,
    },
    /// A Slack incoming webhook (Mattermost, Rocket.Chat and Discord's Slack-compatible
    /// endpoint take the same): `{"text": ...}`.
    Slack { url: SecretUrl },
}

/// A URL that may carry a token (Slack's do): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        match url.scheme() {
            "http" | "https" if url.host_str().is_some() => Ok(Self(url)),
            "http" | "https" => Err("has no host".into()),
            other => Err(format!("scheme {other:?} is not http or https")),
        }
    }

    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecretUrl({}://{}/***)",
            self.0.scheme(),
            self.0.host_str().unwrap_or("")
        )
    }
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Webhook { .. } => "webhook",
            Target::Telegram { .. } => "telegram",
            Target::Slack { .. } => "slack",
        }
    }

    /// A message as this kind of receiver is sent it: the webhook's JSON, or the text.
    /// Rendered once, when a notification is queued.
    pub fn render(&self, message: Message<'_>) -> String {
        match self {
            Target::Webhook { .. } => message.webhook_body(),
            Target::Telegram { .. } | Target::Slack { .. } => message.text(),
        }
    }

    /// Sends one rendered message. `id` is its idempotency key: the same on every
    /// retry.
    pub async fn send(&self, client: &Client, id: &str, rendered: &str, now_s: i64) -> Outcome {
        let request = match self {
            Target::Webhook { url, key } => {
                let body = rendered.as_bytes().to_vec();
                let signature = key.sign(id, now_s, &body);
                client
                    .post(url.url().clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", now_s.to_string())
                    .header("webhook-signature", signature)
                    .body(body)
            }
            Target::Telegram {
                api_url,
                token,
                chat_id,
            } => {
                let url = format!(
                    "{}/bot{}/sendMessage",
                    api_url.as_str().trim_end_matches('/'),
                    token.expose()
                );
                client.post(url).json(&serde_json::json!({
                    "chat_id": chat_id,
                    "text": rendered,
                    "disable_web_page_preview": true,
                }))
            }
            Target::Slack { url } => client
                .post(url.url().clone())
                .json(&serde_json::json!({ "text": rendered })),
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(retry_after_seconds);
                let body = response.text().await.unwrap_or_default();
                classify(status, retry_after, &body)
            }
            // Connection refused, reset, timed out: the receiver may be back soon.
            // `without_url`: a Telegram or Slack URL carries its token.
            Err(e) => Outcome::Retry {
                error: describe(&e.without_url()),
                after: None,
            },
        }
    }
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// 408, 429, 5xx, or no answer; `after`: what the receiver asked for.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Any other 4xx: sending it again would not help.
    Dead {
        error: String,
    },
}

fn classify(status: StatusCode, retry_after: Option<Duration>, body: &str) -> Outcome {
    let error = || {
        let snippet: String = body.chars().take(200).collect();
        format!("{status}: {}", snippet.trim())
    };
    if status.is_success() {
        Outcome::Delivered {
            status: status.as_u16(),
        }
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        // Telegram says how long to wait in its body rather than a header.
        let telegram_wait = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["parameters"]["retry_after"].as_u64())
            .map(Duration::from_secs);
        Outcome::Retry {
            error: error(),
            after: retry_after.or(telegram_wait),
        }
    } else {
        Outcome::Dead { error: error() }
    }
}

fn retry_after_seconds(value: &HeaderValue) -> Option<Duration> {
    value
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An error and its causes on one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sorted_into_delivered_retry_and_dead() {
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, ""),
            Outcome::Delivered { status: 204 }
        );
        for status in [408, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(status).expect("status");
            assert!(
                matches!(classify(status, None, ""), Outcome::Retry { .. }),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 410, 422] {
            let status = StatusCode::from_u16(status).expect("status");
            assert!(
                matches!(classify(status, None, "nope"), Outcome::Dead { error } if error.contains("nope")),
                "{status}"
            );
        }
    }

    #[test]
    fn a_receiver_that_says_when_is_heard() {
        let telegram = r#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}"#;
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, None, telegram),
            Outcome::Retry {
                error: format!("429 Too Many Requests: {telegram}"),
                after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(30)), ""),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(30)
        ));
    }

    #[test]
    fn urls_with_tokens_do_not_print() {
        let url = SecretUrl::parse("https://hooks.slack.com/services/T000/B000/XXXX").expect("url");
        assert_eq!(format!("{url:?}"), "SecretUrl(https://hooks.slack.com/***)");
        assert!(SecretUrl::parse("ftp://x").is_err());
        assert!(SecretUrl::parse("not a url").is_err());
    }
}
