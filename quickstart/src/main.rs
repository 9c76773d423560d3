use std::convert::Infallible;

use abyss::{Bytes, Request, Server, service_fn};

#[tokio::main]
async fn main() -> Result<(), abyss::Error> {
    // Listen for Ctrl-C and SIGTERM from now on.
    let stop = abyss::shutdown_signal();
    let handle = Server::bind("127.0.0.1:0")
        .serve(service_fn(|request: Request| async move {
            // Request in, optional reply out.
            Ok::<Option<Bytes>, Infallible>(Some(request.into_payload()))
        }))
        .await?;
    println!("listening on {}", handle.local_addr());

    // Serve until then; then stop reading, drain, report.
    let report = handle.shutdown_on(stop).await;
    println!("drained {}, aborted {}", report.drained, report.aborted);
    Ok(())
}
