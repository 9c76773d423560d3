//! The counter example's session, and the summary that stands in for a log
//! line per forgotten peer.

use std::time::Duration;

use abyss::Request;
use abyss::session::{Session, SessionContext, Sessions, Step};

/// Counts one peer's datagrams; `reset` ends the session.
#[derive(Debug, Default)]
pub struct Counter(u64);

impl Session for Counter {
    async fn handle(&mut self, request: Request) -> Step {
        if request.payload().trim_ascii() == b"reset" {
            return Step::close().reply("reset\n");
        }
        self.0 += 1;
        Step::keep().reply(format!("{}\n", self.0))
    }

    async fn on_idle(&mut self, context: &SessionContext) -> Step {
        // Per peer at DEBUG only: peers (and spoofed sources) decide how
        // many of these there are. INFO gets `log_forgotten`'s summary.
        tracing::debug!(peer = %context.peer(), count = self.0, "forgetting a quiet peer");
        Step::close()
    }
}

/// Says, at INFO and at most once per `every`, how many quiet peers
/// `sessions` forgot since it last said so: one line however many there
/// were. Runs until dropped.
pub async fn log_forgotten<S: Session, K>(sessions: Sessions<S, K>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = sessions.stats().timed_out;
    loop {
        ticks.tick().await;
        let stats = sessions.stats();
        if stats.timed_out > reported {
            let forgotten = stats.timed_out - reported;
            tracing::info!(forgotten, live = stats.live, every = ?every, "forgot quiet peers");
            reported = stats.timed_out;
        }
    }
}
