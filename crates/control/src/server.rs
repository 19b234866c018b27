//! The controller's HTTP edge: routes, the cluster token, body limits, JSON errors. Each mutating
//! call runs the core under one lock and commits the core's changes to SQLite before answering.

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::Metrics;
use crate::store::Store;
use myriad_core::{Core, CoreConfig, CoreError};
use net::auth::load_or_create_token;
use net::client::{Client, ClientError};
use net::http::{require_token, shutdown_signal, ApiError};
use proto::api::MAX_LOG_TAIL_BYTES;
use proto::api::{
    Event, HeartbeatRequest, JobId, JobSeries, JobView, NodeView, RegisterRequest, SubmitReply,
    MAX_BODY_BYTES,
};
use proto::spec::JobSpec;

/// A core error as the API answers it: 400 for a bad spec, 404 for an unknown node or job, 409
/// for a conflict.
fn core_error(e: CoreError) -> ApiError {
    let status = match &e {
        CoreError::Spec(_) => StatusCode::BAD_REQUEST,
        CoreError::UnknownNode(_) | CoreError::UnknownJob(_) => StatusCode::NOT_FOUND,
        CoreError::Conflict(_) => StatusCode::CONFLICT,
    };
    ApiError::new(status, e.to_string())
}

/// The controller's clock: the wall clock when the process started, advanced by the monotonic
/// clock since. Liveness is judged on it, so a wall clock stepped forward or back (NTP, an
/// operator) neither loses nodes nor hides lost ones; it stays near the wall clock for the times
/// events show.
pub fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (start, wall_ms) = *ANCHOR.get_or_init(|| {
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        (std::time::Instant::now(), wall_ms)
    });
    wall_ms + start.elapsed().as_millis() as u64
}

struct Inner {
    core: Core,
    /// Bumped by every call that leaves the core with changes not yet written.
    generation: u64,
}

/// The controller: its core behind one lock, the store behind another, and the cluster token.
///
/// Writes are batched (group commit): a call runs the core under the lock, then waits until a
/// writer thread has committed every change up to the state its answer saw. At 1,250 nodes a
/// job's row would otherwise be rewritten on every heartbeat while 10,000 ranks start; batched,
/// it is written once per transaction, and the core is never held while SQLite writes.
pub struct Controller {
    inner: Mutex<Inner>,
    store: Mutex<Store>,
    /// The newest generation on disk.
    durable: tokio::sync::watch::Sender<u64>,
    flush: Arc<FlushSignal>,
    token: Arc<str>,
    state_dir: PathBuf,
    /// Serialised rendezvous tables of the current attempts, built once and served to every node.
    peers: Mutex<HashMap<(JobId, u32), Bytes>>,
    metrics: Metrics,
}

/// Wakes the writer thread.
#[derive(Default)]
struct FlushSignal {
    requested: Mutex<bool>,
    cv: Condvar,
}

/// How long the writer sleeps between checks that its controller still exists.
const WRITER_IDLE_CHECK: Duration = Duration::from_millis(200);

pub const TOKEN_FILE: &str = "token";
pub const URL_FILE: &str = "controller.url";
pub const PID_FILE: &str = "controller.pid";
const DB_FILE: &str = "state.db";
/// Deadline for a doorbell to an agent.
const DOORBELL_TIMEOUT: Duration = Duration::from_secs(1);
/// Doorbells rung at once. A restart of 12,500 nodes rings every one of them: one connection
/// each, on top of a connection per agent's heartbeats, would pass the 20,000 open files a
/// controller may be limited to. The rest wait their turn (each for at most its deadline).
const DOORBELLS_AT_ONCE: usize = 512;
/// Deadline for the controller's calls to agents (log fetches).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Controller {
    /// Opens (or creates) the state directory, its token and database, restores the core, and
    /// starts the writer thread (it ends when the controller is dropped).
    pub fn open(state_dir: &FsPath, cfg: CoreConfig) -> Result<Arc<Controller>, String> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("state directory {}: {e}", state_dir.display()))?;
        // The database holds jobs' environments: readable by the cluster's owner only.
        std::fs::set_permissions(state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| format!("state directory {}: {e}", state_dir.display()))?;
        let token = load_or_create_token(&state_dir.join(TOKEN_FILE))?;
        let store = Store::open(&state_dir.join(DB_FILE)).map_err(|e| e.to_string())?;
        let snap = store.load().map_err(|e| e.to_string())?;
        let core = Core::restore(cfg, snap.nodes, snap.jobs, snap.next_job_id, snap.next_event_seq, now_ms());
        let ctl = Arc::new(Controller {
            inner: Mutex::new(Inner { core, generation: 0 }),
            store: Mutex::new(store),
            durable: tokio::sync::watch::channel(0).0,
            flush: Arc::new(FlushSignal::default()),
            token: token.into(),
            state_dir: state_dir.into(),
            peers: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
        });
        let (weak, flush) = (Arc::downgrade(&ctl), ctl.flush.clone());
        let doorbells = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name("controller-writer".into())
            .spawn(move || write_loop(weak, flush, doorbells))
            .map_err(|e| format!("cannot start the controller's writer thread: {e}"))?;
        Ok(ctl)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Runs `f` on the core under the lock, then answers once everything the answer may have
    /// seen is committed: a restarted controller never forgets what it acknowledged.
    async fn apply<T>(&self, f: impl FnOnce(&mut Core, u64) -> Result<T, CoreError>) -> Result<T, ApiError> {
        let (result, generation) = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let result = f(&mut inner.core, now_ms());
            if inner.core.has_changes() {
                inner.generation += 1;
            }
            (result, inner.generation)
        };
        let mut durable = self.durable.subscribe();
        if *durable.borrow() < generation {
            self.flush.request();
            // The writer either commits or stops the process, so this wait ends.
            let _ = durable.wait_for(|&g| g >= generation).await;
        }
        result.map_err(core_error)
    }

    fn read<T>(&self, f: impl FnOnce(&Core) -> T) -> T {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&inner.core)
    }

    fn read_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&store)
    }

    /// The time-driven half of the core: lost nodes, launch timeouts, scheduling. `since_last`
    /// is the time since the previous tick began: longer than a heartbeat interval, and the
    /// controller itself was not running (paused, stalled), so no node is blamed for its silence.
    pub async fn tick(&self, since_last: Duration) -> Result<(), ApiError> {
        let stalled = since_last >= self.heartbeat_interval();
        self.apply(|core, now| {
            if stalled {
                // What the controller missed: the gap, less the tick it would have waited anyway.
                let tick_ms = core.config().tick_ms;
                core.controller_stalled(now, (since_last.as_millis() as u64).saturating_sub(tick_ms));
            }
            core.tick(now);
            Ok(())
        })
        .await
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.read(|c| c.config().heartbeat_interval_ms))
    }

    /// The rendezvous table of a job's attempt, serialised once and shared by every caller.
    fn peer_table(&self, job_id: JobId, attempt: u32) -> Result<Bytes, ApiError> {
        if let Some(bytes) = self.peers.lock().unwrap_or_else(|p| p.into_inner()).get(&(job_id, attempt)) {
            return Ok(bytes.clone());
        }
        let (table, current) = self.read(|core| {
            let current: Vec<(JobId, u32)> = self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .filter(|&(j, a)| {
                    let job = core.job(j).filter(|job| !job.state.is_final());
                    job.and_then(|job| job.attempt.as_ref()).is_some_and(|x| x.number == a)
                })
                .collect();
            (core.peer_table(job_id, attempt), current)
        });
        let bytes = Bytes::from(serde_json::to_vec(&table.map_err(core_error)?).expect("serialises"));
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Only tables of attempts still in progress are kept: the cache never outgrows the jobs
        // that are running.
        peers.retain(|key, _| current.contains(key));
        peers.insert((job_id, attempt), bytes.clone());
        Ok(bytes)
    }
}

impl FlushSignal {
    fn request(&self) {
        *self.requested.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Waits for a request (or the idle check); true when one came.
    fn wait(&self) -> bool {
        let mut requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        if !*requested {
            requested =
                self.cv.wait_timeout(requested, WRITER_IDLE_CHECK).unwrap_or_else(|p| p.into_inner()).0;
        }
        std::mem::take(&mut *requested)
    }
}

/// The writer thread: takes the core's changes in one batch, commits them in one transaction
/// outside the core's lock, publishes the generation it made durable, then rings doorbells.
fn write_loop(ctl: Weak<Controller>, flush: Arc<FlushSignal>, doorbells: Option<tokio::runtime::Handle>) {
    let ringing = Arc::new(tokio::sync::Semaphore::new(DOORBELLS_AT_ONCE));
    loop {
        let requested = flush.wait();
        let Some(ctl) = ctl.upgrade() else { return };
        if !requested {
            continue;
        }
        let (changes, generation) = {
            let mut inner = ctl.inner.lock().unwrap_or_else(|p| p.into_inner());
            (inner.core.take_changes(), inner.generation)
        };
        if let Err(e) = ctl.store.lock().unwrap_or_else(|p| p.into_inner()).save(&changes) {
            // The core has moved on and the disk has not: answering now would acknowledge state
            // a restart would not have. Fail-stop; a restarted controller reloads the last
            // committed state and the agents re-report everything since.
            eprintln!("controller: cannot persist state ({e}); stopping so a restart reloads it");
            std::process::exit(70);
        }
        ctl.durable.send_replace(generation);
        ctl.metrics.observe_events(&changes.events);
        if let Some(runtime) = &doorbells {
            ring_doorbells(runtime, &ringing, &ctl.token, &changes);
        }
    }
}

/// Nodes with new commands are told to heartbeat now instead of at their next interval: a
/// restart then waits on no one's heartbeat period. Best effort; the heartbeat still comes. The
/// doorbell names the node (`?node=`): agents sharing one address and port (the control-plane
/// bench's simulated ones) know whose it is; an agent of its own ignores it.
fn ring_doorbells(
    runtime: &tokio::runtime::Handle,
    ringing: &Arc<tokio::sync::Semaphore>,
    token: &str,
    changes: &myriad_core::Changes,
) {
    let commanded: std::collections::HashSet<myriad_core::NodeId> =
        changes.commanded.iter().copied().collect();
    let news = |n: &&myriad_core::Node| commanded.contains(&n.id) && n.health == myriad_core::Health::Healthy;
    for node in changes.nodes.iter().filter(news) {
        let base = format!("http://{}:{}", node.addr, node.http_port);
        let Ok(client) = Client::new(&base, token, DOORBELL_TIMEOUT).map(Client::unpooled) else { continue };
        let path = format!("/v1/wake?node={}", node.name);
        let ringing = ringing.clone();
        runtime.spawn(async move {
            let Ok(_turn) = ringing.acquire_owned().await else { return };
            let _ = client.call(Method::POST, &path, None).await;
        });
    }
}

/// Every route. The API sits behind the token check and the body limit; the dashboard's three
/// files do not, as they hold no cluster data (the page asks for the token and sends it with
/// every API call it makes).
pub fn router(ctl: Arc<Controller>) -> Router {
    let token = ctl.token.clone();
    let dashboard = Router::new()
        .route("/", get(|| crate::web::asset(crate::web::INDEX)))
        .route("/dashboard.js", get(|| crate::web::asset(crate::web::SCRIPT)))
        .route("/dashboard.css", get(|| crate::web::asset(crate::web::STYLE)));
    let api = Router::new()
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/{name}/heartbeat", post(heartbeat))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/jobs/{id}/series", get(job_series))
        .route("/v1/jobs/{id}/attempts/{attempt}/peers", get(job_peers))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/events", get(all_events))
        .route("/v1/chaos", post(chaos))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(ctl.clone(), time_request))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(token, require_token))
        .with_state(ctl);
    dashboard.merge(api)
}

/// Observes how long each matched route takes to answer.
async fn time_request(State(ctl): State<Arc<Controller>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    if let Some(route) = route {
        ctl.metrics.observe_request(method.as_str(), &route, started.elapsed().as_secs_f64());
    }
    response
}

/// The API's OpenAPI 3.1 document; `every_route_is_in_the_openapi_document` keeps it in step with
/// the routes above.
pub const OPENAPI_JSON: &str = include_str!("../api/openapi.json");

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics(State(ctl): State<Arc<Controller>>) -> Response {
    let text = ctl.read(|core| ctl.metrics.render(core, now_ms()));
    ([("content-type", net::http::METRICS_CONTENT_TYPE)], text).into_response()
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    proto::api::from_json(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

async fn register(
    State(ctl): State<Arc<Controller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: RegisterRequest = parse_json(&body?, "registration")?;
    let reply = ctl.apply(|core, now| core.register(req, now)).await?;
    Ok(Json(reply).into_response())
}

async fn heartbeat(
    State(ctl): State<Arc<Controller>>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name?;
    let req: HeartbeatRequest = parse_json(&body?, "heartbeat")?;
    let reply = ctl.apply(|core, now| core.heartbeat(&name, req, now)).await?;
    Ok(Json(reply).into_response())
}

async fn submit(
    State(ctl): State<Arc<Controller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let content_type =
        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let spec = if content_type.contains("toml") {
        let text =
            std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("job: the TOML is not UTF-8"))?;
        JobSpec::from_toml(text)
    } else {
        JobSpec::from_json(&body)
    }
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = ctl.apply(|core, now| core.submit(spec, now)).await?;
    Ok((StatusCode::CREATED, Json(SubmitReply { id })).into_response())
}

async fn list_jobs(State(ctl): State<Arc<Controller>>) -> Json<Vec<JobView>> {
    Json(ctl.read(|core| core.jobs().filter_map(|j| core.job_view(j.id, now_ms())).collect()))
}

async fn get_job(
    State(ctl): State<Arc<Controller>>,
    id: Result<Path<JobId>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Path(id) = id?;
    ctl.read(|core| core.job_view(id, now_ms()))
        .map(Json)
        .ok_or_else(|| core_error(CoreError::UnknownJob(id)))
}

async fn cancel(
    State(ctl): State<Arc<Controller>>,
    id: Result<Path<JobId>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Path(id) = id?;
    ctl.apply(|core, now| core.cancel(id, now)).await?;
    ctl.read(|core| core.job_view(id, now_ms()))
        .map(Json)
        .ok_or_else(|| core_error(CoreError::UnknownJob(id)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

const MAX_EVENTS_PER_CALL: usize = 10_000;

fn events(ctl: &Controller, job_id: Option<JobId>, q: EventQuery) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = q.limit.unwrap_or(MAX_EVENTS_PER_CALL).min(MAX_EVENTS_PER_CALL);
    ctl.read_store(|store| store.events(job_id, q.after, limit))
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn job_events(
    State(ctl): State<Arc<Controller>>,
    id: Result<Path<JobId>, PathRejection>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let Path(id) = id?;
    if ctl.read(|core| core.job(id).is_none()) {
        return Err(core_error(CoreError::UnknownJob(id)));
    }
    events(&ctl, Some(id), q?.0)
}

async fn job_series(
    State(ctl): State<Arc<Controller>>,
    id: Result<Path<JobId>, PathRejection>,
) -> Result<Json<JobSeries>, ApiError> {
    let Path(id) = id?;
    ctl.read(|core| core.job_series(id)).map(Json).ok_or_else(|| core_error(CoreError::UnknownJob(id)))
}

async fn all_events(
    State(ctl): State<Arc<Controller>>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    events(&ctl, None, q?.0)
}

/// The rendezvous table of an attempt: where every rank runs, MASTER_ADDR and MASTER_PORT. The
/// same bytes go to every node, so serving 1,250 of them costs one serialisation.
async fn job_peers(
    State(ctl): State<Arc<Controller>>,
    path: Result<Path<(JobId, u32)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((id, attempt)) = path?;
    let bytes = ctl.peer_table(id, attempt)?;
    Ok(([("content-type", "application/json")], Body::from(bytes)).into_response())
}

async fn list_nodes(State(ctl): State<Arc<Controller>>) -> Json<Vec<NodeView>> {
    Json(ctl.read(|core| core.node_views(now_ms())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    rank: u32,
    attempt: Option<u32>,
    stream: Option<String>,
    tail_bytes: Option<u64>,
    /// The bytes from this offset on, for a follower (`myriad logs --follow`, `myriad run`).
    offset: Option<u64>,
}

/// Fetches a rank's log from the agent of the node it ran on.
async fn job_logs(
    State(ctl): State<Arc<Controller>>,
    id: Result<Path<JobId>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let Query(q) = q?;
    let stream = q.stream.unwrap_or_else(|| "stdout".into());
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::bad_request(format!("stream {stream:?} must be stdout or stderr")));
    }
    let tail = q.tail_bytes.unwrap_or(MAX_LOG_TAIL_BYTES).min(MAX_LOG_TAIL_BYTES);
    let (base, attempt, local_rank) = ctl
        .read(|core| {
            core.locate_rank(id, q.rank, q.attempt).map(|(node, attempt, local)| {
                (format!("http://{}:{}", node.addr, node.http_port), attempt, local)
            })
        })
        .map_err(core_error)?;
    let agent = Client::new(&base, &ctl.token, AGENT_CALL_TIMEOUT).map_err(ApiError::bad_request)?;
    if q.offset.is_some() && q.tail_bytes.is_some() {
        return Err(ApiError::bad_request("give offset or tail_bytes, not both"));
    }
    let range = match q.offset {
        Some(offset) => format!("offset={offset}"),
        None => format!("tail_bytes={tail}"),
    };
    let path = format!("/v1/logs/{id}/{attempt}/{local_rank}/{stream}?{range}");
    match agent.call(Method::GET, &path, None).await {
        Ok(bytes) => Ok(([("content-type", "text/plain; charset=utf-8")], Body::from(bytes)).into_response()),
        Err(ClientError::Status { status, message }) => {
            Err(ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), message))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the agent holding rank {} is unreachable: {e}", q.rank),
        )),
    }
}

/// Runs the controller until SIGINT or SIGTERM: binds, writes `controller.url` into the state
/// directory (so `--listen 127.0.0.1:0` works), serves, and ticks the core.
pub async fn serve(listen: &str, state_dir: &FsPath, mut cfg: CoreConfig) -> Result<(), String> {
    // A new key at every start: attempts launched before keep the secrets their launches carry.
    cfg.comm_secret_key = net::auth::random_bytes()?;
    let ctl = Controller::open(state_dir, cfg)?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let url = format!("http://{addr}");
    write_atomically(&ctl.state_dir.join(URL_FILE), url.as_bytes())?;
    write_atomically(&ctl.state_dir.join(PID_FILE), std::process::id().to_string().as_bytes())?;
    eprintln!("controller listening on {url} (state in {})", state_dir.display());

    let ticker = ctl.clone();
    let tick_every = Duration::from_millis(ctl.read(|c| c.config().tick_ms).max(1));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick_every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = std::time::Instant::now();
        loop {
            interval.tick().await;
            let since_last = last.elapsed();
            last = std::time::Instant::now();
            if let Err(e) = ticker.tick(since_last).await {
                eprintln!("controller: {}", e.message);
            }
        }
    });
    axum::serve(listener, router(ctl))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Writes a file under a temporary name and renames it, so readers never see half of it.
pub fn write_atomically(path: &FsPath, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

/// Injects a fault through the agent that can: the node of a job's rank (or of its rank 0 for
/// checkpoints), or a node named directly. Recorded as an event, so the timeline shows cause and
/// effect.
async fn chaos(
    State(ctl): State<Arc<Controller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    use proto::api::{ChaosAction, ChaosRequest};
    let mut req: ChaosRequest = parse_json(&body?, "chaos")?;
    let (base, node_name) = ctl.read(|core| -> Result<(String, String), ApiError> {
        let node = match (&req.node, req.job_id) {
            (Some(name), _) => {
                core.node(name).ok_or_else(|| core_error(CoreError::UnknownNode(name.clone())))?
            }
            (None, Some(job)) => {
                let rank =
                    if req.action == ChaosAction::CorruptCheckpoint { 0 } else { req.rank.unwrap_or(0) };
                let (node, _, local) = core.locate_rank(job, rank, None).map_err(core_error)?;
                req.rank = Some(local);
                node
            }
            (None, None) => return Err(ApiError::bad_request("chaos needs job_id (and rank) or node")),
        };
        Ok((format!("http://{}:{}", node.addr, node.http_port), node.name.clone()))
    })?;
    let agent = Client::new(&base, &ctl.token, AGENT_CALL_TIMEOUT).map_err(ApiError::bad_request)?;
    let json = serde_json::to_vec(&req).expect("serialises");
    agent.call(Method::POST, "/v1/chaos", Some((json, "application/json"))).await.map_err(|e| match e {
        ClientError::Status { status, message } => {
            ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), message)
        }
        e => ApiError::new(StatusCode::BAD_GATEWAY, format!("node {node_name}: {e}")),
    })?;
    let what = format!("{:?}", req.action);
    ctl.apply(|core, now| {
        core.event(
            now,
            req.job_id,
            Some(&node_name),
            proto::events::EventKind::Chaos,
            format!("injected {what} on node {node_name}"),
        );
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
