#!/usr/bin/env python3
"""Derives the scene's two sidecar configurations from the seed dump.

    python3 examples/scene/derive.py ../shared/corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml

The seed is fortio-server's sidecar as istiod programmed it (Istio 1.14.3). Each scene pod gets a
config dump of the same shape, cut down to what the article's request meets:
- bootstrap: the seed's, without the `extensions` catalogue and `dynamic_resources` (the
  resources below stand in for what ADS would send); netshoot's node is netshoot's (its id,
  labels, IP and owner as the article's x-envoy-peer-metadata header decodes them);
- listeners: the two static ones (15090 Prometheus, 15021 health), virtualOutbound (15001),
  the outbound `0.0.0.0_8080` and virtualInbound. fortio-server's virtualInbound keeps the
  chains for port 8080 and the catch-alls, and only the TLS ones: the scene runs the namespace
  in STRICT mTLS (a PeerAuthentication that istiod turns into "no raw_buffer chains");
  netshoot, which serves no port, keeps the seed's catch-alls as they are (PERMISSIVE);
- clusters: the static ones, BlackHoleCluster, PassthroughCluster, InboundPassthroughClusterIpv4,
  `outbound|8080||fortio-server.mark.svc.cluster.local` and (fortio-server) `inbound|8080||`;
- route `8080` with its `allow_any` and fortio-server virtual hosts; the fortio-server endpoint
  (172.21.206.230:8080, tlsMode istio);
- secrets `default` and `ROOTCA` read from /etc/certs/{cert-chain,key,root-cert}.pem, the paths
  Istio mounted certificates at before SDS; the scene points them at its test CA's files.
Addresses stay the article's: the scene gives its network namespaces those addresses.
"""
import copy
import os
import sys

import yaml

seed = yaml.safe_load(open(sys.argv[1]))
out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
boot, clusters, endpoints, listeners, scoped, routes, secrets = seed["configs"]

NETSHOOT_NODE = {
    "id": "sidecar~172.21.206.228~netshoot.mark~mark.svc.cluster.local",
    "cluster": "netshoot.mark",
    "metadata": {
        "APP_CONTAINERS": "netshoot",
        "INSTANCE_IPS": "172.21.206.228",
        "LABELS": {
            "security.istio.io/tlsMode": "istio",
            "service.istio.io/canonical-name": "netshoot",
            "service.istio.io/canonical-revision": "latest",
        },
        "NAME": "netshoot",
        "OWNER": "kubernetes://apis/v1/namespaces/mark/pods/netshoot",
        "WORKLOAD_NAME": "netshoot",
    },
}
FORTIO = "outbound|8080||fortio-server.mark.svc.cluster.local"


def derive(pod):
    b = copy.deepcopy(boot)
    bs = b["bootstrap"]
    del bs["dynamic_resources"]
    bs["node"].pop("extensions", None)
    if pod == "netshoot":
        md = bs["node"]["metadata"]
        for k in ("ANNOTATIONS", "POD_PORTS"):
            md.pop(k, None)
        md.update(NETSHOOT_NODE["metadata"])
        bs["node"]["id"] = NETSHOOT_NODE["id"]
        bs["node"]["cluster"] = NETSHOOT_NODE["cluster"]
    else:
        # The kubectl annotation repeats the pod spec: not part of what the sidecar uses.
        bs["node"]["metadata"]["ANNOTATIONS"].pop(
            "kubectl.kubernetes.io/last-applied-configuration", None
        )

    keep = {"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughClusterIpv4", FORTIO}
    if pod == "fortio-server":
        keep.add("inbound|8080||")
    c = copy.deepcopy(clusters)
    c["dynamic_active_clusters"] = [
        x for x in c["dynamic_active_clusters"] if x["cluster"]["name"] in keep
    ]

    e = copy.deepcopy(endpoints)
    e["dynamic_endpoint_configs"] = [
        x
        for x in e["dynamic_endpoint_configs"]
        if x["endpoint_config"].get("cluster_name") == FORTIO
    ]

    l = copy.deepcopy(listeners)
    kept = []
    for x in l["dynamic_listeners"]:
        if x["name"] not in ("virtualOutbound", "0.0.0.0_8080", "virtualInbound"):
            continue
        if x["name"] == "virtualInbound":
            chains = x["active_state"]["listener"]["filter_chains"]
            if pod == "fortio-server":
                chains = [
                    fc
                    for fc in chains
                    if fc.get("filter_chain_match", {}).get("destination_port") in (None, 8080, 15006)
                    and (
                        fc.get("filter_chain_match", {}).get("destination_port") == 15006
                        or fc.get("filter_chain_match", {}).get("transport_protocol") == "tls"
                    )
                ]
            else:
                chains = [
                    fc
                    for fc in chains
                    if fc.get("filter_chain_match", {}).get("destination_port") in (None, 15006)
                ]
            x["active_state"]["listener"]["filter_chains"] = chains
        kept.append(x)
    l["dynamic_listeners"] = kept

    r = copy.deepcopy(routes)
    r["dynamic_route_configs"] = [
        x for x in r["dynamic_route_configs"] if x["route_config"]["name"] == "8080"
    ]
    for x in r["dynamic_route_configs"]:
        x["route_config"]["virtual_hosts"] = [
            v
            for v in x["route_config"]["virtual_hosts"]
            if v["name"] in ("allow_any", "fortio-server.mark.svc.cluster.local:8080")
        ]

    s = copy.deepcopy(secrets)
    for x in s["dynamic_active_secrets"]:
        sec = x["secret"]
        if "tls_certificate" in sec:
            sec["tls_certificate"] = {
                "certificate_chain": {"filename": "/etc/certs/cert-chain.pem"},
                "private_key": {"filename": "/etc/certs/key.pem"},
            }
        if "validation_context" in sec:
            sec["validation_context"] = {"trusted_ca": {"filename": "/etc/certs/root-cert.pem"}}

    doc = {"configs": [b, c, e, l, scoped, r, s]}
    path = os.path.join(out, f"{pod}.config_dump.yaml")
    with open(path, "w") as f:
        f.write(
            f"# {pod}'s sidecar in the scene, derived from the seed dump by derive.py (see there).\n"
        )
        yaml.safe_dump(doc, f, sort_keys=False, width=100)
    print(path)


for pod in ("fortio-server", "netshoot"):
    derive(pod)
