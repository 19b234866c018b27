//! The API without sockets: requests go straight into the router.

use super::*;
use tower::ServiceExt;

struct Fixture {
    dir: PathBuf,
    ctl: Arc<Controller>,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("myriad-server-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ctl = Controller::open(&dir, CoreConfig::default()).unwrap();
        Fixture { dir, ctl }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
        ct: &str,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(uri).header("content-type", ct);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = router(self.ctl.clone()).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn call(&self, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let token = self.ctl.token().to_string();
        let ct = if body.starts_with('{') { "application/json" } else { "application/toml" };
        self.send(method, uri, Some(&token), body.as_bytes().to_vec(), ct).await
    }

    async fn register(&self, name: &str, slots: u32) {
        let body =
            format!(r#"{{"name":"{name}","slots":{slots},"cores":2,"addr":"127.0.0.1","http_port":1}}"#);
        assert_eq!(self.call("POST", "/v1/agents/register", &body).await.0, StatusCode::OK);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/agents/register"),
    ("POST", "/v1/agents/n1/heartbeat"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/1"),
    ("POST", "/v1/jobs/1/cancel"),
    ("GET", "/v1/jobs/1/events"),
    ("GET", "/v1/jobs/1/logs"),
    ("GET", "/v1/jobs/1/series"),
    ("GET", "/v1/jobs/1/attempts/0/peers"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/route"),
];

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_token() {
    let f = Fixture::new("auth");
    for &(method, uri) in ROUTES {
        for token in [None, Some("wrong"), Some("")] {
            let (status, body) = f.send(method, uri, token, b"{}".to_vec(), "application/json").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri} with token {token:?}: {body}");
            assert!(body.contains("cluster token"), "{body}");
        }
        let (status, _) = f.call(method, uri, "{}").await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {uri} with the right token");
    }
}

#[tokio::test]
async fn an_oversize_body_gets_413() {
    let f = Fixture::new("size");
    let big = format!(r#"{{"name":"x","argv":["{}"]}}"#, "a".repeat(MAX_BODY_BYTES));
    for uri in ["/v1/jobs", "/v1/agents/register", "/v1/agents/n1/heartbeat"] {
        let (status, body) = f.call("POST", uri, &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {body}");
    }
}

#[tokio::test]
async fn bad_jobs_get_a_4xx_naming_the_field() {
    let f = Fixture::new("bad");
    f.register("n1", 2).await;
    f.register("n2", 2).await;
    let ok = "name = \"j\"\nargv = [\"true\"]\nnodes = 2\nranks_per_node = 2\n";
    let cases = [
        ("name = \"j\"\nargv = [\"true\"\n", "argv"),
        (&*format!("{ok}colour = \"red\"\n"), "colour"),
        (&ok.replace("ranks_per_node = 2", "ranks_per_node = 0"), "ranks_per_node"),
        (&format!("{ok}checkpoint_dir = \"../../etc\"\n"), "checkpoint_dir"),
        (&format!("{ok}workdir = \"/tmp/../etc\"\n"), "workdir"),
        (&ok.replace("\"j\"", "\"../j\""), "name"),
    ];
    for (toml, field) in cases {
        let (status, body) = f.call("POST", "/v1/jobs", toml).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{toml}: {body}");
        assert!(body.contains(field), "error for {toml:?} should name {field}: {body}");
    }
    // Well-formed, but more than this cluster could ever hold: 409, still naming the field.
    for (toml, field) in [
        (ok.replace("nodes = 2", "nodes = 3"), "nodes"),
        (ok.replace("ranks_per_node = 2", "ranks_per_node = 4"), "ranks_per_node"),
    ] {
        let (status, body) = f.call("POST", "/v1/jobs", &toml).await;
        assert_eq!(status, StatusCode::CONFLICT, "{toml}: {body}");
        assert!(body.contains(field), "error for {toml:?} should name {field}: {body}");
    }
    let (status, body) = f.call("POST", "/v1/jobs", ok).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(f.call("GET", "/v1/jobs/abc", "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(f.call("GET", "/v1/jobs/99", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(f.call("GET", "/v1/jobs/1/logs?stream=../../etc/passwd", "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(f.call("GET", "/v1/jobs/1/logs?rank=9", "").await.0, StatusCode::CONFLICT);
    assert_eq!(f.call("GET", "/v1/events?after=x", "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(f.call("POST", "/v1/agents/nobody/heartbeat", "{}").await.0, StatusCode::BAD_REQUEST);
    let hb = r#"{"acked_command_seq":0,"ranks":[],"ports":[]}"#;
    assert_eq!(f.call("POST", "/v1/agents/nobody/heartbeat", hb).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn state_and_events_survive_reopening_the_state_directory() {
    let f = Fixture::new("reopen");
    f.register("n1", 1).await;
    let (status, _) = f.call("POST", "/v1/jobs", "name = \"j\"\nargv = [\"true\"]\n").await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, before) = f.call("GET", "/v1/events", "").await;
    let reopened =
        Fixture { dir: f.dir.clone(), ctl: Controller::open(&f.dir, CoreConfig::default()).unwrap() };
    assert_eq!(reopened.ctl.token(), f.ctl.token(), "the token is kept");
    let (_, after) = reopened.call("GET", "/v1/events", "").await;
    assert_eq!(before, after);
    let (_, job) = reopened.call("GET", "/v1/jobs/1", "").await;
    assert!(job.contains("\"state\":\"starting\""), "{job}");
    std::mem::forget(reopened); // `f` removes the directory
}

#[tokio::test]
async fn the_rendezvous_table_is_served_once_the_attempt_is_launched() {
    let f = Fixture::new("peers");
    f.register("n1", 2).await;
    f.register("n2", 2).await;
    let (status, body) =
        f.call("POST", "/v1/jobs", "name = \"j\"\nargv = [\"true\"]\nnodes = 2\nranks_per_node = 2\n").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = f.call("GET", "/v1/jobs/1/attempts/0/peers", "").await;
    assert_eq!(status, StatusCode::CONFLICT, "no MASTER_PORT yet: {body}");
    assert!(body.contains("not launched"), "{body}");

    let (_, job) = f.call("GET", "/v1/jobs/1", "").await;
    let job: JobView = serde_json::from_str(&job).unwrap();
    let hb = r#"{"acked_command_seq":1,"ranks":[],"ports":[{"job_id":1,"attempt":0,"port":29400}]}"#;
    let (status, body) = f.call("POST", &format!("/v1/agents/{}/heartbeat", job.nodes[0]), hb).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"command\":\"launch\""), "{body}");

    let (status, body) = f.call("GET", "/v1/jobs/1/attempts/0/peers", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let table: proto::api::PeerTable = serde_json::from_str(&body).unwrap();
    assert_eq!((table.world_size, table.ranks_per_node, table.master_port), (4, 2, 29400));
    assert_eq!(table.hosts, vec!["127.0.0.1".to_string(); 2]);
    // Served from the cache the second time, byte for byte.
    assert_eq!(f.call("GET", "/v1/jobs/1/attempts/0/peers", "").await.1, body);

    assert_eq!(f.call("GET", "/v1/jobs/1/attempts/1/peers", "").await.0, StatusCode::CONFLICT);
    assert_eq!(f.call("GET", "/v1/jobs/9/attempts/0/peers", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(f.call("GET", "/v1/jobs/1/attempts/x/peers", "").await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_node_given_a_command_has_its_doorbell_rung_naming_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::new("doorbell");
    // The node's agent is this listener: it reads the doorbell's request line and answers 204.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(r#"{{"name":"n1","slots":1,"cores":2,"addr":"127.0.0.1","http_port":{port}}}"#);
    assert_eq!(f.call("POST", "/v1/agents/register", &body).await.0, StatusCode::OK);
    let (status, body) = f.call("POST", "/v1/jobs", "name = \"j\"\nargv = [\"true\"]\nnodes = 1\n").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The job's port reservation is a new command for n1: the writer rings its doorbell.
    let rung = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the doorbell closed before its headers ended");
            request.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        String::from_utf8_lossy(&request).into_owned()
    })
    .await
    .expect("no doorbell within 10 s");
    assert!(rung.starts_with("POST /v1/wake?node=n1 HTTP/1.1\r\n"), "{rung}");
    assert!(rung.contains(&format!("authorization: Bearer {}", f.ctl.token())), "{rung}");
}

/// Routes as the router declares them: `(METHOD, path)` from every `.route("path", get(..).post(..))`
/// in server.rs.
fn declared_routes() -> std::collections::BTreeSet<(String, String)> {
    let source = include_str!("server.rs");
    let mut routes = std::collections::BTreeSet::new();
    for line in source.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
        let path = line[".route(\"".len()..].split('"').next().unwrap().to_string();
        let handlers = &line[line.find(',').unwrap()..];
        for method in ["get", "post", "put", "delete", "patch"] {
            if handlers.contains(&format!(" {method}(")) || handlers.contains(&format!(".{method}(")) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_route_is_in_the_openapi_document_and_nothing_else() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let declared = declared_routes();
    assert!(declared.len() >= 18, "parsed only {declared:?} from server.rs");
    assert_eq!(declared, documented, "routes in server.rs vs paths in api/openapi.json");
    // Every schema reference resolves.
    let text = OPENAPI_JSON;
    for piece in text.split("\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap();
        assert!(doc["components"]["schemas"].get(name).is_some(), "unresolved schema {name}");
    }
}

#[tokio::test]
async fn the_document_and_the_metrics_are_served() {
    let f = Fixture::new("docs");
    f.register("n1", 2).await;
    let (status, body) = f.call("GET", "/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, OPENAPI_JSON);
    let (status, text) = f.call("GET", "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        "myriad_node_up{node=\"n1\"} 1",
        "myriad_node_slots{node=\"n1\"} 2",
        "# TYPE myriad_http_request_duration_seconds histogram",
        "myriad_http_request_duration_seconds_count{method=\"GET\",route=\"/openapi.json\"} 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

#[tokio::test]
async fn integers_written_as_floats_are_read_as_the_integers_they_are() {
    let f = Fixture::new("floats");
    let body = r#"{"name":"n1","slots":2.0,"cores":8.0,"addr":"127.0.0.1","http_port":1.0}"#;
    let (status, reply) = f.call("POST", "/v1/agents/register", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (_, nodes) = f.call("GET", "/v1/nodes", "").await;
    assert!(nodes.contains("\"slots\":2"), "{nodes}");
    // A fraction is still no integer, and the error names the field's type.
    let body = r#"{"name":"n2","slots":2.5,"cores":8,"addr":"127.0.0.1","http_port":1}"#;
    let (status, reply) = f.call("POST", "/v1/agents/register", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(reply.contains("u32"), "{reply}");
}

#[tokio::test]
async fn the_dashboard_is_served_without_the_token_under_a_strict_policy() {
    let f = Fixture::new("web");
    for (uri, content_type, needle) in [
        ("/", "text/html", "/dashboard.js"),
        ("/dashboard.js", "text/javascript", "Bearer "),
        ("/dashboard.css", "text/css", ".node-grid"),
    ] {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = router(f.ctl.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let headers = resp.headers().clone();
        assert!(headers["content-type"].to_str().unwrap().starts_with(content_type), "{uri}: {headers:?}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{uri}: {csp}");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains(needle), "{uri} lacks {needle:?}");
    }
    // The page runs no inline script or style, which the policy would block anyway.
    let page = crate::web::INDEX_HTML;
    assert!(!page.contains("<script>") && !page.contains(" style=") && !page.contains("<style"), "{page}");
}

#[tokio::test]
async fn a_jobs_series_is_served_and_an_unknown_job_is_404() {
    let f = Fixture::new("series");
    f.register("n1", 1).await;
    let (status, body) = f.call("POST", "/v1/jobs", r#"{"name":"j","argv":["true"]}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = f.call("GET", "/v1/jobs/1/series", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let series: proto::api::JobSeries = serde_json::from_str(&body).unwrap();
    assert_eq!((series.job_id, series.points.len()), (1, 0));
    assert_eq!(f.call("GET", "/v1/jobs/2/series", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(f.call("GET", "/v1/jobs/x/series", "").await.0, StatusCode::BAD_REQUEST);
}
