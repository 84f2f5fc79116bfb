//! The control socket's server: many clients at once on one thread (a tokio runtime of
//! its own), each with a deadline to send its request and a bound on its size, so a
//! slow, silent or oversized client costs nothing but its own connection.
//!
//! Read-only requests (`status`, `stats`) are answered here from the manager's
//! published view and a worker snapshot, without waiting for changes in flight;
//! changes go to the manager's thread one at a time, in arrival order.

use crate::control::manager::{lock, ManagerMsg, SharedClassifier, SharedView};
use crate::control::protocol::{Request, Response, MAX_REQUEST};
use crate::datapath::worker::{Command, WorkerHandle};
use anyhow::{anyhow, Result};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

/// How long a client has to send its whole request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client has to take its response.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(10);
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 256;

/// What the server reads and whom it asks.
#[derive(Clone)]
pub struct Ctx {
    pub manager: Sender<ManagerMsg>,
    pub worker: WorkerHandle,
    pub view: SharedView,
    pub classifier: Option<SharedClassifier>,
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: std::os::unix::net::UnixListener, ctx: Ctx) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, &ctx).await {
                debug!("control client: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn client(stream: UnixStream, ctx: &Ctx) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut limited = BufReader::new(rd).take(MAX_REQUEST as u64 + 1);
    let read = limited.read_until(b'\n', &mut line);
    let resp = match tokio::time::timeout(REQUEST_DEADLINE, read).await {
        Err(_) => Response::error(format!(
            "no complete request within {} s",
            REQUEST_DEADLINE.as_secs()
        )),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Response::error(format!("request larger than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(req) => answer(req, ctx).await,
            Err(e) => Response::error(format!("bad request: {e}")),
        },
    };
    drop(line);
    let mut text = serde_json::to_vec(&resp)?;
    text.push(b'\n');
    tokio::time::timeout(RESPONSE_DEADLINE, wr.write_all(&text))
        .await
        .map_err(|_| anyhow!("the client did not take its response"))??;
    Ok(())
}

async fn answer(req: Request, ctx: &Ctx) -> Response {
    if req.is_read_only() {
        return Response::from_result(read_only(req, ctx).await);
    }
    let (tx, rx) = oneshot::channel();
    if ctx.manager.send(ManagerMsg::Request(req, tx)).is_err() {
        return Response::error("the daemon is shutting down".into());
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the daemon is shutting down".into()))
}

async fn read_only(req: Request, ctx: &Ctx) -> Result<serde_json::Value> {
    let counters = ctx
        .worker
        .ask_async(|reply| Command::Snapshot { reply })
        .await?;
    let view = lock(&ctx.view).clone();
    Ok(match req {
        Request::Status => serde_json::to_value(view.status(&counters))?,
        Request::Stats { name } => {
            let verdicts = ctx.classifier.as_ref().map(|c| lock(c).verdicts());
            let s = view
                .violin_stats(&name, &counters, verdicts.as_ref())
                .ok_or_else(|| anyhow!("no Violin named {name:?} on host {}", view.host))?;
            serde_json::to_value(s)?
        }
        _ => unreachable!("only read-only requests come here"),
    })
}
