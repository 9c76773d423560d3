//! Waiting for the signals that ask a service to stop.

/// Resolves on Ctrl-C (SIGINT) or, on unix, SIGTERM: what service managers
/// and terminals send to ask a program to stop. Give it to
/// [`ServerHandle::shutdown_on`](crate::ServerHandle::shutdown_on).
///
/// On unix the handlers are installed when this is called, not when the
/// future is first polled: call it before the program says it is ready
/// (prints its address, notifies its supervisor), so that a signal sent
/// from then on is never missed (the default action would end the process
/// without draining). Must be called within a tokio runtime. If a signal
/// cannot be listened for, that is logged and the other is still waited
/// for.
///
/// # Example
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), abyss::Error> {
/// # let echo = abyss::service_fn(|r: abyss::Request| async move { Ok::<_, std::convert::Infallible>(r.into_payload()) });
/// let stop = abyss::shutdown_signal();
/// let handle = abyss::Server::bind("127.0.0.1:0").serve(echo).await?;
/// println!("listening on {}", handle.local_addr());
/// let report = handle.shutdown_on(stop).await;
/// println!("drained {}, aborted {}", report.drained, report.aborted);
/// # Ok(()) }
/// ```
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = listen(signal(SignalKind::interrupt()), "SIGINT");
        let terminate = listen(signal(SignalKind::terminate()), "SIGTERM");
        async move {
            tokio::select! {
                () = interrupt => {}
                () = terminate => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(target: crate::middleware::targets::LISTENER, %error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

/// Waits for a signal whose handler was installed (or failed to be).
#[cfg(unix)]
async fn listen(installed: std::io::Result<tokio::signal::unix::Signal>, name: &'static str) {
    match installed {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(error) => {
            tracing::error!(target: crate::middleware::targets::LISTENER, %error, signal = name, "cannot listen for the signal");
            std::future::pending::<()>().await;
        }
    }
}
