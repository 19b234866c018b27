//! The web dashboard: one page, its script and its style sheet, compiled into the binary because
//! cluster machines are offline (no CDN). The files hold no cluster data, so they are served
//! without the token; the page asks for the token (or takes it from the URL's `#token=` fragment,
//! which never reaches a server or its logs) and sends it with every API call it makes.

use axum::response::{IntoResponse, Response};

/// A file of the dashboard.
#[derive(Clone, Copy)]
pub struct Asset {
    content_type: &'static str,
    body: &'static str,
}

pub const INDEX_HTML: &str = include_str!("../web/index.html");
pub const INDEX: Asset = Asset { content_type: "text/html; charset=utf-8", body: INDEX_HTML };
pub const SCRIPT: Asset =
    Asset { content_type: "text/javascript; charset=utf-8", body: include_str!("../web/dashboard.js") };
pub const STYLE: Asset =
    Asset { content_type: "text/css; charset=utf-8", body: include_str!("../web/dashboard.css") };

/// Scripts and styles only from this origin, no inline code, no framing: text the cluster's
/// users wrote (job names, commands, rank exits) cannot run as script in an operator's browser.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn asset(a: Asset) -> Response {
    (
        [
            ("content-type", a.content_type),
            ("content-security-policy", CONTENT_SECURITY_POLICY),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            // A new binary serves new files: never run yesterday's script against today's API.
            ("cache-control", "no-cache"),
        ],
        a.body,
    )
        .into_response()
}
