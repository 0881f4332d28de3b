//! The `planproxy-test-apiserver` binary, driven from outside the process:
//! kubeconfigs and fault injection through the admin endpoint.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Kills the server process when the test ends, also on failure.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One plain HTTP/1.1 request to the admin endpoint; returns (status, body).
async fn admin(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the admin endpoint must accept connections");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the request must be sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("the response must be read");
    let status = response[9..12]
        .parse()
        .expect("the response must have a status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}})).expect("a config map must decode")
}

#[tokio::test]
async fn the_binary_serves_kubeconfigs_and_takes_faults_over_its_admin_endpoint() {
    let child = Command::new(env!("CARGO_BIN_EXE_planproxy-test-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = ServerProcess(child);
    let stdout = process.0.stdout.take().unwrap();
    let ready = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let fields: std::collections::HashMap<&str, &str> = ready
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect();
    assert!(ready.starts_with("ready "), "{ready}");
    let admin_addr = fields["admin"].to_string();
    assert!(fields["url"].starts_with("https://127.0.0.1:"));

    assert_eq!(admin(&admin_addr, "GET", "/healthz").await.0, 200);
    let (status, kubeconfig) = admin(&admin_addr, "GET", "/kubeconfig/tester").await;
    assert_eq!(status, 200);
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");

    cms.create(&PostParams::default(), &config_map("a"))
        .await
        .unwrap();
    assert_eq!(
        admin(
            &admin_addr,
            "POST",
            "/faults/fail-writes?fraction=1&code=500"
        )
        .await
        .0,
        200
    );
    match cms.create(&PostParams::default(), &config_map("b")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 500),
        other => panic!("expected an injected 500, got {other:?}"),
    }
    assert_eq!(admin(&admin_addr, "POST", "/faults/clear").await.0, 200);
    cms.create(&PostParams::default(), &config_map("b"))
        .await
        .unwrap();

    let (_, counters) = admin(&admin_addr, "GET", "/counters").await;
    let counters: Value = serde_json::from_str(&counters).unwrap();
    assert!(
        counters
            .as_array()
            .unwrap()
            .contains(&json!({"verb": "create", "resource": "configmaps", "count": 3})),
        "{counters}"
    );
    assert_eq!(
        admin(
            &admin_addr,
            "POST",
            "/faults/outage?seconds=1&mode=sideways"
        )
        .await
        .0,
        400
    );
}
