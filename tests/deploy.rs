//! The shipped deployment agrees with itself: the config inside the
//! ConfigMap is valid, every name Istio routes to snigress is one its policy
//! allows, and names, ports, identities and timings line up across the
//! Kubernetes and Istio manifests. (Schema validation of the manifests is
//! in deploy/validate.sh, which CI runs.)

use std::path::{Path, PathBuf};

use serde_json::Value;
use snigress::config::Config;
use snigress::identity::Principal;
use snigress::name::ServerName;
use snigress::policy::{Decision, Policy};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The config embedded in the ConfigMap, written out for the CLI too.
fn configmap_config() -> (Config, tempfile::TempDir) {
    let cm = manifest("deploy/kubernetes/configmap.yaml");
    let text = cm["data"]["snigress.yaml"].as_str().expect("snigress.yaml in the ConfigMap").to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("snigress.yaml"), &text).expect("write");
    let config = Config::parse(&text, "configmap.yaml", Path::new("/")).unwrap_or_else(|e| panic!("{e}"));
    (config, dir)
}

#[test]
fn every_shipped_config_passes_snigress_check() {
    let (_, dir) = configmap_config();
    let configmap = dir.path().join("snigress.yaml");
    let local = root().join("config/local.yaml");
    let reference = root().join("config/snigress.yaml");
    for (path, skip_files) in [(&local, false), (&reference, true), (&configmap, true)] {
        let mut args = vec!["check".to_owned(), "--config".to_owned(), path.display().to_string()];
        if skip_files {
            args.push("--skip-cert-files".into());
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snigress")).args(&args).output().expect("run check");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn every_name_istio_routes_here_is_allowed() {
    let (config, _dir) = configmap_config();
    let policy = Policy::compile(&config.policy);
    let vs = manifest("deploy/istio/virtualservice.yaml");
    let se = manifest("deploy/istio/serviceentry.yaml");
    let mut hosts = strings(&vs["spec"]["hosts"]);
    hosts.extend(strings(&se["spec"]["hosts"]));
    for route in vs["spec"]["tls"].as_array().expect("tls routes") {
        for m in route["match"].as_array().expect("matches") {
            hosts.extend(strings(&m["sniHosts"]));
        }
    }
    assert!(!hosts.is_empty());
    for host in hosts {
        // A wildcard host stands for every name below it: probe one.
        let probe = host.strip_prefix("*.").map_or(host.clone(), |suffix| format!("probe-name.{suffix}"));
        let name = ServerName::parse(&probe).unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(
            matches!(policy.decide(&name, None), Decision::Allowed(_)),
            "Istio sends {host} to snigress but its policy refuses {probe}: a deploy bug"
        );
    }
    // The classic case: every Wikipedia but the English one.
    let decide = |n: &str| policy.decide(&ServerName::parse(n).unwrap(), None);
    assert!(matches!(decide("de.wikipedia.org"), Decision::Allowed(_)));
    assert!(matches!(decide("en.wikipedia.org"), Decision::Denied(_)));
}

#[test]
fn names_ports_identities_and_timings_line_up() {
    let (config, _dir) = configmap_config();
    let deployment = manifest("deploy/kubernetes/deployment.yaml");
    let service = manifest("deploy/kubernetes/service.yaml");
    let account = manifest("deploy/kubernetes/serviceaccount.yaml");
    let vs = manifest("deploy/istio/virtualservice.yaml");
    let dr = manifest("deploy/istio/destinationrule.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // The Service, the route and the DestinationRule name the same host.
    let namespace = service["metadata"]["namespace"].as_str().expect("namespace");
    let fqdn = format!("{}.{namespace}.svc.cluster.local", service["metadata"]["name"].as_str().expect("name"));
    assert_eq!(dr["spec"]["host"], fqdn.as_str());
    for route in vs["spec"]["tls"].as_array().expect("routes") {
        assert_eq!(route["route"][0]["destination"]["host"], fqdn.as_str());
        let port = route["route"][0]["destination"]["port"]["number"].as_u64();
        assert_eq!(port, service["spec"]["ports"][0]["port"].as_u64(), "the route targets the Service port");
    }
    assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "ISTIO_MUTUAL");

    // Sidecars accept exactly the gateway pods' identity.
    let sa = pod["serviceAccountName"].as_str().expect("serviceAccountName");
    assert_eq!(account["metadata"]["name"], sa);
    let id = format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}");
    assert_eq!(strings(&dr["spec"]["trafficPolicy"]["tls"]["subjectAltNames"]), std::slice::from_ref(&id));
    assert!(Principal::parse(&id).is_ok());

    // The Service port is named tls-* and reaches the mtls listener.
    let port_name = service["spec"]["ports"][0]["name"].as_str().expect("port name");
    assert!(port_name.starts_with("tls"), "sidecars need a tls-* port name, got {port_name}");
    let container_port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .expect("the Service's target port on the container");
    let mtls = config.listeners.iter().find(|l| l.mode == snigress::config::Mode::Mtls).expect("an mtls listener");
    assert_eq!(u64::from(mtls.address.port()), container_port);

    // Probes and scraping use the metrics address.
    let metrics_port = config.metrics.address.expect("metrics.address").port();
    let probe_port_name = container["readinessProbe"]["httpGet"]["port"].as_str().expect("probe port");
    let probe_port = container["ports"].as_array().unwrap().iter().find(|p| p["name"] == probe_port_name).unwrap();
    assert_eq!(probe_port["containerPort"].as_u64(), Some(u64::from(metrics_port)));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The certificate files are where the Istio agent writes them.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    let proxy_config = annotations["proxy.istio.io/config"].as_str().expect("proxy config");
    let output = proxy_config.lines().find_map(|l| l.trim().strip_prefix("OUTPUT_CERTS:")).expect("OUTPUT_CERTS");
    let settings = config.outer_settings().expect("mtls settings");
    for file in [&settings.paths.cert, &settings.paths.key, &settings.paths.client_ca] {
        assert!(file.starts_with(output.trim()), "{} is not under OUTPUT_CERTS {output}", file.display());
    }
    assert_eq!(annotations["traffic.sidecar.istio.io/includeInboundPorts"], "");
    assert_eq!(annotations["traffic.sidecar.istio.io/includeOutboundIPRanges"], "");

    // Kubernetes waits longer than snigress's grace period plus its drain.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let needed = config.shutdown.grace_period + config.shutdown.drain_timeout;
    assert!(grace > needed.as_secs(), "terminationGracePeriodSeconds {grace} <= {needed:?}");
}

/// The documents of a multi-document YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split("\n---\n").map(|doc| serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{path}: {e}"))).collect()
}

#[test]
fn the_ambient_waypoint_lines_up_with_what_ztunnel_sends() {
    use snigress::config::{ProxyIdentity, VerifyDestination};
    let cm = manifest("deploy/ambient/configmap.yaml");
    let text = cm["data"]["snigress.yaml"].as_str().expect("snigress.yaml in the ConfigMap");
    let config = Config::parse(text, "ambient/configmap.yaml", Path::new("/")).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("snigress.yaml"), text).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snigress"))
        .args(["check", "--config", &dir.path().join("snigress.yaml").display().to_string()])
        .output()
        .expect("run check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // ztunnel connects from inside the pod to the bound port, with a v2
    // header carrying the identity; the destination is a VIP.
    let [listener] = config.listeners.as_slice() else { panic!("one listener") };
    let proxy = listener.proxy_protocol.as_ref().expect("proxy_protocol");
    let gateway = documents("deploy/ambient/gateway.yaml").pop().expect("the Gateway");
    assert_eq!(gateway["kind"], "Gateway");
    let binding = gateway["metadata"]["annotations"]["ambient.istio.io/waypoint-inbound-binding"].as_str();
    assert_eq!(binding, Some(format!("PROXY/{}", listener.address.port()).as_str()));
    assert!(listener.address.ip().is_loopback(), "only the pod's ztunnel may connect");
    assert!(proxy.versions.v2 && proxy.identity == ProxyIdentity::IstioTlv);
    assert!(proxy.trusted_sources.iter().any(|n| n.contains(&listener.address.ip())));
    assert_eq!(listener.verify_destination, VerifyDestination::Off, "a VIP is no name's address");

    // The HBONE port, the Service, the pods, their config and DNS.
    let service = manifest("deploy/ambient/service.yaml");
    let deployment = manifest("deploy/ambient/deployment.yaml");
    let hbone = &gateway["spec"]["listeners"][0]["port"];
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert!(ports.iter().any(|p| p["port"] == *hbone), "the Service carries the Gateway's HBONE port");
    let template = &deployment["spec"]["template"];
    assert_eq!(service["spec"]["selector"]["app"], template["metadata"]["labels"]["app"]);
    assert_eq!(template["metadata"]["annotations"]["ambient.istio.io/dns-capture"], "false");
    assert_eq!(template["spec"]["volumes"][0]["configMap"]["name"], cm["metadata"]["name"]);
    let namespace = manifest("deploy/ambient/namespace.yaml");
    assert_eq!(namespace["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient");

    // The ServiceEntry uses this waypoint, and its hosts are the policy's.
    let se = manifest("deploy/ambient/serviceentry.yaml");
    assert_eq!(se["metadata"]["labels"]["istio.io/use-waypoint"], gateway["metadata"]["name"]);
    assert_eq!(se["spec"]["resolution"], "DYNAMIC_DNS");
    let policy = Policy::compile(&config.policy);
    let sleep = Principal::parse("spiffe://cluster.local/ns/default/sa/sleep").ok();
    let other = Principal::parse("spiffe://cluster.local/ns/default/sa/other").ok();
    let decide = |name: &str, who: &Option<Principal>| {
        matches!(policy.decide(&ServerName::parse(name).expect("name"), who.as_ref()), Decision::Allowed(_))
    };
    for host in strings(&se["spec"]["hosts"]) {
        let example = host.replace('*', "de");
        assert!(decide(&example, &sleep), "{example} (from {host}) is allowed");
    }
    assert!(!decide("en.wikipedia.org", &sleep), "the English one is denied");
    assert!(decide("upload.wikimedia.org", &sleep) && !decide("upload.wikimedia.org", &other), "per identity");
}
