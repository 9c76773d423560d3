use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};

#[cfg(doc)]
use super::Step;
use super::step::Next;
use super::{Context, Session, SessionService};
use crate::middleware::DropReason;
use crate::{BoxError, Error, Request};

const TARGET: &str = "abyss::session";

/// The defaults: the original's `num_connections` and `read_timeout`.
const DEFAULT_MAX_SESSIONS: usize = 16_384;
const DEFAULT_QUEUE_SIZE: usize = 64;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Factory<S> = dyn Fn(SocketAddr) -> S + Send + Sync;
type KeyFn<K> = dyn Fn(&Request) -> K + Send + Sync;

/// A datagram handed to a session, with where its outcome goes.
pub(super) struct Job {
    request: Request,
    outcome: oneshot::Sender<Outcome>,
}

/// What became of a datagram a session handled.
pub(super) enum Outcome {
    Reply(Option<Bytes>),
    Failed(BoxError),
    Panicked(Box<dyn Any + Send>),
}

struct Entry {
    id: u64,
    queue: mpsc::Sender<Job>,
}

/// The live sessions of one [`SessionService`], and their counters.
///
/// Cheap to clone: clones share the sessions. See the [module
/// docs](super).
pub struct Sessions<S, K = SocketAddr> {
    registry: Arc<Registry<S, K>>,
}

impl<S, K> Clone for Sessions<S, K> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<S, K> fmt::Debug for Sessions<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("max_sessions", &self.registry.max_sessions)
            .field("queue_size", &self.registry.queue_size)
            .field("idle_timeout", &self.registry.idle_timeout)
            .finish_non_exhaustive()
    }
}

pub(super) struct Registry<S, K> {
    factory: Box<Factory<S>>,
    key: Box<KeyFn<K>>,
    max_sessions: usize,
    queue_size: usize,
    idle_timeout: Duration,
    live: Mutex<HashMap<K, Entry>>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
    running: AtomicUsize,
    ended: Notify,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    refused: AtomicU64,
    queue_full: AtomicU64,
    closed: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    shut_down: AtomicU64,
}

/// Counters of a [`Sessions`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// Sessions alive now.
    pub live: usize,
    /// Sessions started.
    pub created: u64,
    /// Datagrams from new peers dropped because `max_sessions` were live.
    pub refused: u64,
    /// Datagrams dropped because their session's queue was full.
    pub queue_full: u64,
    /// Sessions ended by [`Step::close`] (from a datagram or an idle
    /// timeout).
    pub closed: u64,
    /// Idle timeouts that fired ([`Session::on_idle`] calls).
    pub timed_out: u64,
    /// Sessions ended by [`Step::error`].
    pub failed: u64,
    /// Sessions ended by a panic.
    pub panicked: u64,
    /// Sessions ended by [`Sessions::shutdown`].
    pub shut_down: u64,
}

/// Options of a [`Sessions`]; from [`Sessions::builder`].
pub struct SessionsBuilder<S, K = SocketAddr> {
    factory: Box<Factory<S>>,
    key: Box<KeyFn<K>>,
    max_sessions: usize,
    queue_size: usize,
    idle_timeout: Duration,
}

impl<S, K> fmt::Debug for SessionsBuilder<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionsBuilder")
            .field("max_sessions", &self.max_sessions)
            .field("queue_size", &self.queue_size)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<S: Session> Sessions<S, SocketAddr> {
    /// Sessions whose state `factory` creates for each new peer (the
    /// original's `init`), keyed by peer address. The factory runs while
    /// the session table is locked: keep it quick.
    pub fn builder(
        factory: impl Fn(SocketAddr) -> S + Send + Sync + 'static,
    ) -> SessionsBuilder<S, SocketAddr> {
        SessionsBuilder {
            factory: Box::new(factory),
            key: Box::new(Request::peer),
            max_sessions: DEFAULT_MAX_SESSIONS,
            queue_size: DEFAULT_QUEUE_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl<S: Session, K> SessionsBuilder<S, K> {
    /// Live sessions at most (default 16 384, the original's
    /// `num_connections`).
    pub fn max_sessions(mut self, sessions: usize) -> Self {
        self.max_sessions = sessions;
        self
    }

    /// Datagrams each session queues at most while it is busy (default 64).
    pub fn queue_size(mut self, datagrams: usize) -> Self {
        self.queue_size = datagrams;
        self
    }

    /// How long a session waits for a datagram before
    /// [`Session::on_idle`] (default 60 s, the original's `read_timeout`).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Which datagrams share a session: by default those from one peer
    /// address; `key` can group them otherwise (by IP only, by a protocol
    /// field).
    pub fn key<K2>(
        self,
        key: impl Fn(&Request) -> K2 + Send + Sync + 'static,
    ) -> SessionsBuilder<S, K2> {
        SessionsBuilder {
            factory: self.factory,
            key: Box::new(key),
            max_sessions: self.max_sessions,
            queue_size: self.queue_size,
            idle_timeout: self.idle_timeout,
        }
    }

    /// Checks the options.
    pub fn build(self) -> Result<Sessions<S, K>, Error> {
        if self.max_sessions == 0 {
            return Err(Error::config("max_sessions", "must be at least 1"));
        }
        if self.queue_size == 0 {
            return Err(Error::config("queue_size", "must be at least 1"));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::config("idle_timeout", "must be longer than zero"));
        }
        Ok(Sessions {
            registry: Arc::new(Registry {
                factory: self.factory,
                key: self.key,
                max_sessions: self.max_sessions,
                queue_size: self.queue_size,
                idle_timeout: self.idle_timeout,
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                shutdown: watch::Sender::new(false),
                running: AtomicUsize::new(0),
                ended: Notify::new(),
                counters: Counters::default(),
            }),
        })
    }
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Sessions<S, K> {
    /// The service that routes datagrams to sessions. Clones share the
    /// sessions.
    pub fn service(&self) -> SessionService<S, K> {
        SessionService::new(self.registry.clone())
    }

    /// Lets every session finish its queued datagrams, calls its
    /// [`Session::on_shutdown`], and waits until all have ended. Sessions
    /// started afterwards (by datagrams still in flight) end the same way
    /// once their queue is empty.
    pub async fn shutdown(&self) {
        let registry = &self.registry;
        registry.shutdown.send_replace(true);
        loop {
            let ended = registry.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if registry.running.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Sessions<S, K> {
    /// [`shutdown`](Sessions::shutdown) as an owned future, for
    /// [`Builder::on_shutdown`](crate::Builder::on_shutdown):
    /// `.on_shutdown(move || sessions.clone().shutdown_owned())`.
    pub async fn shutdown_owned(self) {
        self.shutdown().await;
    }
}

impl<S, K> Sessions<S, K> {
    /// The counters.
    pub fn stats(&self) -> SessionStats {
        let c = &self.registry.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        SessionStats {
            live: self.registry.lock().len(),
            created: load(&c.created),
            refused: load(&c.refused),
            queue_full: load(&c.queue_full),
            closed: load(&c.closed),
            timed_out: load(&c.timed_out),
            failed: load(&c.failed),
            panicked: load(&c.panicked),
            shut_down: load(&c.shut_down),
        }
    }
}

impl<S, K> Registry<S, K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a session ended.
enum End {
    Closed,
    /// With the error when [`Session::on_error`] is still to be called.
    Failed(Option<BoxError>),
    Panicked,
    ShutDown,
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Registry<S, K> {
    /// Hands `request` to its session, starting one for a new peer. The
    /// error is the reason it was dropped.
    pub(super) fn dispatch(
        self: &Arc<Self>,
        request: Request,
        outcome: oneshot::Sender<Outcome>,
    ) -> Result<(), DropReason> {
        let key = (self.key)(&request);
        let job = Job { request, outcome };
        let mut live = self.lock();
        let job = match live.get(&key) {
            Some(entry) => match entry.queue.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                    return Err(DropReason::Overloaded);
                }
                // The session's task is gone without unregistering (its
                // runtime was dropped): replace it.
                Err(mpsc::error::TrySendError::Closed(job)) => {
                    live.remove(&key);
                    job
                }
            },
            None => job,
        };
        if live.len() >= self.max_sessions {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: TARGET, peer = %job.request.peer(), "session refused: max_sessions live");
            return Err(DropReason::Overloaded);
        }
        let entry = self.start(key.clone(), vec![job]);
        live.insert(key, entry);
        Ok(())
    }

    /// Starts a session task with `jobs` already queued (at least one).
    /// Called with the table locked.
    fn start(self: &Arc<Self>, key: K, jobs: Vec<Job>) -> Entry {
        let first = &jobs[0].request;
        let context = Context {
            peer: first.peer(),
            sender: first.sender().clone(),
        };
        let state = (self.factory)(context.peer);
        let (queue, receiver) = mpsc::channel(self.queue_size.max(jobs.len()));
        for job in jobs {
            // Room for all: the channel was sized for them.
            let _ = queue.try_send(job);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(target: TARGET, peer = %context.peer, id, "session start");
        tokio::spawn(self.clone().run(key, id, receiver, state, context));
        Entry { id, queue }
    }

    async fn run(
        self: Arc<Self>,
        key: K,
        id: u64,
        mut queue: mpsc::Receiver<Job>,
        mut state: S,
        mut context: Context,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut idle_timeout = self.idle_timeout;
        let mut next_wait: Option<Duration> = None;
        let end = loop {
            let wait = next_wait.take().unwrap_or(idle_timeout);
            let step = tokio::select! {
                // Queued datagrams first: shutdown waits until the queue is empty.
                biased;
                job = queue.recv() => {
                    let Some(job) = job else { break End::ShutDown };
                    context.sender = job.request.sender().clone();
                    match AssertUnwindSafe(state.handle(job.request)).catch_unwind().await {
                        Ok(step) => match step.next {
                            Next::Error(error) => {
                                run_hook(state.on_error(&error, &context)).await;
                                let _ = job.outcome.send(Outcome::Failed(error));
                                break End::Failed(None);
                            }
                            next => {
                                let _ = job.outcome.send(Outcome::Reply(step.reply));
                                next
                            }
                        },
                        Err(panic) => {
                            let _ = job.outcome.send(Outcome::Panicked(panic));
                            break End::Panicked;
                        }
                    }
                }
                () = async { drop(shutdown.wait_for(|stopping| *stopping).await) } => break End::ShutDown,
                () = tokio::time::sleep(wait) => {
                    self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: TARGET, peer = %context.peer, id, "session idle");
                    match AssertUnwindSafe(state.on_idle(&context)).catch_unwind().await {
                        Ok(step) => {
                            if let Some(reply) = &step.reply {
                                let _ = context.sender.send_to(context.peer, reply).await;
                            }
                            match step.next {
                                Next::Error(error) => break End::Failed(Some(error)),
                                next => next,
                            }
                        }
                        Err(_) => break End::Panicked,
                    }
                }
            };
            match step {
                Next::Keep => {}
                Next::KeepFor(timeout) => next_wait = Some(timeout),
                Next::KeepWithIdleTimeout(timeout) => idle_timeout = timeout,
                Next::Close => break End::Closed,
                Next::Error(_) => unreachable!("errors end the loop above"),
            }
        };
        let counter = match &end {
            End::Closed => {
                run_hook(state.on_close(&context)).await;
                &self.counters.closed
            }
            End::Failed(error) => {
                if let Some(error) = error {
                    run_hook(state.on_error(error, &context)).await;
                }
                &self.counters.failed
            }
            End::Panicked => &self.counters.panicked,
            End::ShutDown => {
                run_hook(state.on_shutdown(&context)).await;
                &self.counters.shut_down
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        drop(state);
        self.finish(&key, id, queue);
        tracing::debug!(target: TARGET, peer = %context.peer, id, "session stop");
        self.running.fetch_sub(1, Ordering::AcqRel);
        self.ended.notify_waiters();
    }

    /// Unregisters a session. Datagrams that reached its queue after it
    /// decided to end go, in order, to a fresh session for the same key.
    fn finish(self: &Arc<Self>, key: &K, id: u64, mut queue: mpsc::Receiver<Job>) {
        let mut live = self.lock();
        if live.get(key).is_some_and(|entry| entry.id == id) {
            live.remove(key);
        }
        queue.close();
        let mut leftovers = Vec::new();
        while let Ok(job) = queue.try_recv() {
            leftovers.push(job);
        }
        if !leftovers.is_empty() {
            let entry = self.start(key.clone(), leftovers);
            live.insert(key.clone(), entry);
        }
    }
}

/// Runs a hook; a panic in it is logged, and the session ends anyway.
async fn run_hook(hook: impl std::future::Future<Output = ()>) {
    if AssertUnwindSafe(hook).catch_unwind().await.is_err() {
        tracing::error!(target: TARGET, "a session hook panicked");
    }
}
