//! Retrying sends without duplicates: every attempt carries the same
//! `client_msg_id`, so the server returns the original message for a retry of a send
//! it already accepted.

use std::future::Future;
use std::time::Duration;

use switchboard_proto::v1::{SendRequest, SendResult};
use switchboard_proto::ErrorCode;

use crate::{Client, ClientError, ConnectOptions, Events};

/// Bounded exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry, before jitter.
    pub initial_backoff: Duration,
    /// Cap on the delay before jitter.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1 = the first retry): the capped
    /// exponential delay `d = initial * 2^(retry-1)`, jittered uniformly in
    /// `[d/2, d]` so that many clients failing together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(30);
        let capped = self
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff);
        let half = capped / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random_u64() % jitter_nanos.saturating_add(1))
    }

    /// Run `op` until it succeeds, fails with an error `retry_if` rejects, or the
    /// attempts are used up (the last error is returned). `op` gets the attempt
    /// number, starting at 1.
    pub async fn run<T, F, Fut>(
        &self,
        mut op: F,
        retry_if: impl Fn(&ClientError) -> bool,
    ) -> Result<T, ClientError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < self.max_attempts && retry_if(&e) => {
                    tracing::debug!(attempt, error = %e, "retrying request");
                    // Never sooner than the server asked.
                    tokio::time::sleep(self.backoff(attempt).max(e.retry_after())).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Random bits for jitter, from the same source as UUIDv4 keys.
fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Where each attempt of [`send_reliable`] gets its connection: the same one again,
/// or a new one after the old one closed.
pub trait ClientSource {
    /// A live client for the next attempt.
    fn client(&mut self) -> impl Future<Output = Result<Client, ClientError>> + Send;
}

/// Retrying on one connection: every attempt uses this client.
impl ClientSource for Client {
    fn client(&mut self) -> impl Future<Output = Result<Client, ClientError>> + Send {
        std::future::ready(Ok(self.clone()))
    }
}

/// Keeps one connection open, opening a new one when the current one has ended.
#[derive(Debug)]
pub struct Reconnector {
    /// How to open each connection.
    options: ConnectOptions,
    /// The newest connection.
    current: Option<Client>,
    /// Events of the newest connection, until the caller takes them.
    events: Option<Events>,
    /// Connections opened so far.
    connects: u32,
}

impl Reconnector {
    /// A reconnector that opens its first connection on first use.
    pub fn new(options: ConnectOptions) -> Reconnector {
        Reconnector {
            options,
            current: None,
            events: None,
            connects: 0,
        }
    }

    /// Start from an open connection.
    pub fn with_client(options: ConnectOptions, client: Client, events: Events) -> Reconnector {
        Reconnector {
            options,
            current: Some(client),
            events: Some(events),
            connects: 1,
        }
    }

    /// The live connection, opening a new one if there is none or it has ended.
    pub async fn connection(&mut self) -> Result<Client, ClientError> {
        if let Some(client) = &self.current {
            if !client.is_closed() {
                return Ok(client.clone());
            }
        }
        let (client, events) = Client::connect(self.options.clone()).await?;
        self.connects += 1;
        self.current = Some(client.clone());
        self.events = Some(events);
        Ok(client)
    }

    /// The events of the newest connection, once per connection. After a reconnect
    /// the caller should resync (see [`crate::Timeline::resync`]).
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u32 {
        self.connects
    }
}

impl ClientSource for Reconnector {
    fn client(&mut self) -> impl Future<Output = Result<Client, ClientError>> + Send {
        self.connection()
    }
}

/// Send `request` until it is accepted, retrying retryable failures (timeouts,
/// closed connections, `unavailable`, `timeout`, `draining`, `rate_limited`) with
/// backoff, every attempt with the same `client_msg_id` (one is generated if the
/// request has none). The result of a retry that the server recognised has
/// `duplicate` set.
pub async fn send_reliable<S: ClientSource>(
    source: &mut S,
    mut request: SendRequest,
    policy: &RetryPolicy,
) -> Result<SendResult, ClientError> {
    if request.client_msg_id.is_empty() {
        request.client_msg_id = crate::new_client_msg_id();
    }
    let mut attempt = 1;
    loop {
        let outcome = match source.client().await {
            Ok(client) => client.send_request(request.clone()).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(result) => return Ok(result),
            Err(e) if attempt < policy.max_attempts && e.is_retryable() => {
                tracing::debug!(
                    attempt,
                    conversation_id = %request.conversation_id,
                    client_msg_id = %request.client_msg_id,
                    error = %e,
                    "retrying send"
                );
                // Never sooner than the server asked.
                tokio::time::sleep(policy.backoff(attempt).max(e.retry_after())).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Client {
    /// [`send_reliable`] on this connection only: retries timeouts and retryable
    /// server errors, but not a closed connection (use a [`Reconnector`] for that).
    pub async fn send_reliable(
        &self,
        request: SendRequest,
        policy: &RetryPolicy,
    ) -> Result<SendResult, ClientError> {
        let mut request = request;
        if request.client_msg_id.is_empty() {
            request.client_msg_id = crate::new_client_msg_id();
        }
        policy
            .run(
                |_| self.send_request(request.clone()),
                |e| {
                    matches!(e, ClientError::Timeout)
                        || e.code().is_some_and(|code| {
                            matches!(
                                code,
                                ErrorCode::Unavailable
                                    | ErrorCode::Timeout
                                    | ErrorCode::RateLimited
                            )
                        })
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_jitter_bounds_and_caps() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for (retry, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            for _ in 0..50 {
                let d = policy.backoff(retry);
                assert!(d >= Duration::from_millis(full / 2), "retry {retry}: {d:?}");
                assert!(d <= Duration::from_millis(full), "retry {retry}: {d:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_retry_waits_at_least_what_the_server_asked() {
        let policy = RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        };
        let started = tokio::time::Instant::now();
        let result = policy
            .run(
                |attempt| {
                    std::future::ready(if attempt == 1 {
                        Err(ClientError::Server {
                            code: ErrorCode::RateLimited,
                            message: "slow down".into(),
                            retry_after_ms: 700,
                        })
                    } else {
                        Ok(attempt)
                    })
                },
                ClientError::is_retryable,
            )
            .await;
        assert_eq!(result, Ok(2));
        // Virtual time: the backoff alone would have been at most 10 ms.
        assert!(started.elapsed() >= Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_only_what_it_is_told_and_stops_at_max_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let mut calls = 0;
        let result: Result<(), _> = policy
            .run(
                |_| {
                    calls += 1;
                    std::future::ready(Err(ClientError::Timeout))
                },
                ClientError::is_retryable,
            )
            .await;
        assert_eq!(result, Err(ClientError::Timeout));
        assert_eq!(calls, 3);

        let mut calls = 0;
        let result: Result<(), _> = policy
            .run(
                |_| {
                    calls += 1;
                    std::future::ready(Err(ClientError::Protocol("bad".into())))
                },
                ClientError::is_retryable,
            )
            .await;
        assert!(matches!(result, Err(ClientError::Protocol(_))));
        assert_eq!(calls, 1);

        let result = policy
            .run(
                |attempt| {
                    std::future::ready(if attempt < 3 {
                        Err(ClientError::Timeout)
                    } else {
                        Ok(attempt)
                    })
                },
                ClientError::is_retryable,
            )
            .await;
        assert_eq!(result, Ok(3));
    }
}
