//! The admin endpoint (plain HTTP, separate port): fault injection, counters
//! and kubeconfigs for tests that run the server out of process.
//!
//! | request | effect |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /kubeconfig/<user>` | a kubeconfig (YAML) for that user |
//! | `GET /counters` | request counts: `[{"verb","resource","count"}]` |
//! | `POST /counters/reset` | zero the counters |
//! | `GET /resource-version` | the current global resourceVersion |
//! | `POST /faults/close-watches` | end every open watch |
//! | `POST /faults/expire-next-watches?count=N` | answer the next N watches with 410 |
//! | `POST /faults/fail-writes?fraction=F&code=500\|409[&resource=R]` | fail a fraction of writes (to resource R, e.g. `proxyplans.planproxy.dev/status`) |
//! | `POST /faults/latency?ms=N` | delay every request |
//! | `POST /faults/outage?seconds=S&mode=hang\|refuse` | stop answering for S seconds |
//! | `POST /faults/restart` | drop every connection, keep data |
//! | `POST /faults/clear` | clear every fault |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::json;

use crate::Shared;
use crate::faults::WriteFailure;
use crate::http::{Body, json_response, parse_query};

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// Serves one admin request.
pub async fn serve(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let query = parse_query(request.uri().query());
    let number = |key: &str| query.get(key).and_then(|v| v.parse::<f64>().ok());
    let faults = &shared.api.faults;
    let path = request.uri().path().to_string();
    let ok = || text(StatusCode::OK, "ok\n".into());
    let bad = |why: &str| text(StatusCode::BAD_REQUEST, format!("{why}\n"));
    Ok(match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => ok(),
        (&Method::GET, p) if p.starts_with("/kubeconfig/") => {
            let user = &p["/kubeconfig/".len()..];
            if user.is_empty() {
                bad("missing user")
            } else {
                text(StatusCode::OK, shared.kubeconfig_for(user))
            }
        }
        (&Method::GET, "/counters") => {
            let counts: Vec<_> = shared
                .api
                .counts()
                .into_iter()
                .map(|((verb, resource), count)| json!({"verb": verb, "resource": resource, "count": count}))
                .collect();
            json_response(StatusCode::OK, &counts)
        }
        (&Method::POST, "/counters/reset") => {
            shared.api.reset_counts();
            ok()
        }
        (&Method::GET, "/resource-version") => text(
            StatusCode::OK,
            format!("{}\n", crate::faults::lock(&shared.api.store).current_rv()),
        ),
        (&Method::POST, "/faults/close-watches") => {
            faults.close_watches();
            ok()
        }
        (&Method::POST, "/faults/expire-next-watches") => {
            faults.expire_next_watches(number("count").unwrap_or(1.0) as u32);
            ok()
        }
        (&Method::POST, "/faults/fail-writes") => {
            let kind = match query.get("code").map(String::as_str) {
                None | Some("500") => WriteFailure::Internal,
                Some("409") => WriteFailure::Conflict,
                Some(_) => return Ok(bad("code must be 500 or 409")),
            };
            let fraction = number("fraction").unwrap_or(1.0);
            match query.get("resource").filter(|r| !r.is_empty()) {
                Some(resource) => faults.fail_writes_to(resource, fraction, kind),
                None => faults.fail_writes(fraction, kind),
            }
            ok()
        }
        (&Method::POST, "/faults/latency") => {
            faults.set_latency(Duration::from_secs_f64(
                number("ms").unwrap_or(0.0).max(0.0) / 1000.0,
            ));
            ok()
        }
        (&Method::POST, "/faults/outage") => {
            let mode = match query
                .get("mode")
                .map(String::as_str)
                .unwrap_or("hang")
                .parse::<crate::faults::OutageMode>()
            {
                Ok(mode) => mode,
                Err(why) => return Ok(bad(&why)),
            };
            faults.outage(
                Duration::from_secs_f64(number("seconds").unwrap_or(1.0).max(0.0)),
                mode,
            );
            ok()
        }
        (&Method::POST, "/faults/restart") => {
            faults.restart();
            ok()
        }
        (&Method::POST, "/faults/clear") => {
            faults.clear();
            ok()
        }
        _ => text(StatusCode::NOT_FOUND, format!("no admin endpoint {path}\n")),
    })
}
