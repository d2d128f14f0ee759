//! The daemons' metrics and health endpoint over plain HTTP/1.1: one GET,
//! a scrape parsed as the Prometheus text format, one sample's value.

use std::net::SocketAddr;

use super::poll_until;

/// One GET over a fresh HTTP/1.1 connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8(body.to_vec()).unwrap()))
}

/// Waits until GET `path` on `addr` answers 200; fails with "`what` in
/// `secs` s" and `log()` after `secs` seconds.
pub async fn wait_200(
    what: &str,
    secs: u64,
    log: impl Fn() -> String,
    addr: SocketAddr,
    path: &str,
) {
    poll_until(what, secs, log, || async move {
        matches!(http_get(addr, path).await, Ok((200, _)))
    })
    .await;
}

/// Scrapes `/metrics` on `addr`, which must answer 200, and parses it as
/// the Prometheus text format.
pub async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels are exactly `labels`
/// (counters, gauges and the `_count`/`_sum` of histograms).
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name} is not a single value: {other:?}"),
        })
}
