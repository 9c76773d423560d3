//! Waiting for the signals that ask a service to stop.

/// Resolves on Ctrl-C (SIGINT) or, on unix, SIGTERM: what service managers
/// and terminals send to ask a program to stop. Give it to
/// [`ServerHandle::shutdown_on`](crate::ServerHandle::shutdown_on).
///
/// If a signal cannot be listened for, that is logged and the other one is
/// still waited for.
///
/// # Example
///
/// ```no_run
/// # async fn run(handle: abyss::ServerHandle) {
/// let report = handle.shutdown_on(abyss::shutdown_signal()).await;
/// println!("drained {}, aborted {}", report.drained, report.aborted);
/// # }
/// ```
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(target: crate::middleware::targets::LISTENER, %error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(target: crate::middleware::targets::LISTENER, %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
