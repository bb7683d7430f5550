/**
 * Every metric of the node, defined in one place (prom-client). Label sets are bounded: pods,
 * services and fixed reason codes, never a connection or request id.
 */
import { Counter, Gauge, Registry, collectDefaultMetrics } from '../../shared/prom.js';

import { workloadName, type Workload } from '../../config/snapshot.js';
import { spiffeUri } from '../../identity/spiffe.js';
import { RequestMetrics } from './request-metrics.js';

/** Istio's standard TCP labels (reporter, source_*, destination_*, ...). */
export const TCP_LABELS = [
  'reporter',
  'source_workload',
  'source_workload_namespace',
  'source_principal',
  'source_version',
  'destination_service',
  'destination_service_namespace',
  'destination_service_name',
  'destination_workload',
  'destination_workload_namespace',
  'destination_principal',
  'destination_version',
  'request_protocol',
  'response_flags',
  'connection_security_policy',
] as const;

export type TcpLabels = Record<(typeof TCP_LABELS)[number], string>;

/** Istio's request labels: the TCP ones and the answer's code (HTTP, and gRPC's status). */
export const REQUEST_LABELS = [...TCP_LABELS, 'response_code', 'grpc_response_status'] as const;
export type RequestLabels = Record<(typeof REQUEST_LABELS)[number], string>;

/** Why a connection was refused: one list, shared by logs and metrics. */
export const REFUSE_REASONS = ['no_original_destination', 'no_endpoints', 'passthrough_denied', 'upstream_connect_failed', 'no_workload', 'overflow', 'no_config', 'proxy_port', 'connection_limit', 'connect_limit', 'link_local', 'fd_exhausted', 'internal_error', 'tunnel_failed', 'policy_denied'] as const;
export type RefuseReason = (typeof REFUSE_REASONS)[number];

/** How old the BPF map entry counts on /metrics may be. */
const MAP_SAMPLE_MS = 2000;

export const ENROLL_ERROR_REASONS = ['netns_missing', 'cgroup_missing', 'attach_failed', 'listen_failed', 'probe_failed', 'readopt_failed', 'invalid_record'] as const;
export type EnrollErrorReason = (typeof ENROLL_ERROR_REASONS)[number];

export function principal(trustDomain: string, w: Pick<Workload, 'namespace' | 'serviceAccount'> | undefined): string {
  return w ? spiffeUri({ trustDomain, namespace: w.namespace, serviceAccount: w.serviceAccount }) : 'unknown';
}

/** Istio's workload labels: name (app label or pod name), namespace, version (the version label). */
export function workloadLabels(w: Workload | undefined): { name: string; namespace: string; version: string } {
  return w ? { name: workloadName(w), namespace: w.namespace, version: w.labels['version'] ?? w.labels['app.kubernetes.io/version'] ?? 'unknown' } : { name: 'unknown', namespace: 'unknown', version: 'unknown' };
}

export class NodeMetrics {
  readonly registry = new Registry();
  readonly tcpOpened: Counter<(typeof TCP_LABELS)[number]>;
  readonly tcpClosed: Counter<(typeof TCP_LABELS)[number]>;
  readonly tcpSent: Counter<(typeof TCP_LABELS)[number]>;
  readonly tcpReceived: Counter<(typeof TCP_LABELS)[number]>;
  /** istio_requests_total, istio_request_duration_milliseconds, istio_request_bytes, istio_response_bytes. */
  readonly requests: RequestMetrics;
  readonly sniffed: Counter<'protocol'>;
  readonly httpEngine: Counter<'side' | 'engine' | 'why'>;
  readonly http2Engine: Counter<'side' | 'engine' | 'why'>;
  readonly httpRefused: Counter<'reason'>;
  readonly httpUnread: Counter;
  readonly httpRouted: Counter;
  readonly httpRetries: Counter<'service' | 'result'>;
  readonly httpMirrors: Counter<'service' | 'result'>;
  readonly refused: Counter<'direction' | 'reason'>;
  readonly proxied: Counter<'path'>;
  readonly ejections: Counter<'service'>;
  readonly connectRetries: Counter<'service'>;
  readonly podsEnrolled: Gauge;
  readonly podVerified: Gauge<'namespace' | 'pod'>;
  readonly enrollErrors: Counter<'reason'>;
  readonly mapEntries: Gauge<'map'>;
  readonly channels: Gauge<'state'>;
  readonly channelsMade: Counter;
  readonly configErrors: Counter<'kind'>;
  readonly configRejected: Gauge<'kind'>;
  readonly configObjects: Gauge<'kind'>;
  readonly snapshots: Counter<'result'>;
  readonly controlPlaneConnected: Gauge;
  readonly heldForConfig: Counter;
  readonly relayEnds: Counter<'reason'>;
  readonly acceptErrors: Counter<'code'>;
  readonly captureRefused: Counter<'reason'>;
  readonly enrollments: Counter<'result'>;
  readonly tunnelsOpened: Counter;
  readonly tunnelRefused: Counter<'reason'>;
  readonly certificateRequests: Counter<'result'>;
  readonly certificateExpiry: Gauge<'identity'>;
  readonly trustedRoots: Gauge;
  readonly policyDenials: Counter<'kind' | 'policy' | 'reason' | 'path'>;
  readonly policyAudits: Counter<'policy'>;

  constructor(mapEntries: () => Record<string, number>, captureRefusals: () => Record<string, number> = () => ({}), channels: () => { open: number; unclaimed: number; made: number } = () => ({ open: 0, unclaimed: 0, made: 0 })) {
    const registers = [this.registry];
    let sampled: { at: number; entries: Record<string, number> } | undefined;
    const tcp = (name: string, help: string): Counter<(typeof TCP_LABELS)[number]> =>
      new Counter({ name, help, labelNames: TCP_LABELS, registers });
    this.tcpOpened = tcp('istio_tcp_connections_opened_total', 'TCP connections opened, by the node proxy');
    this.tcpClosed = tcp('istio_tcp_connections_closed_total', 'TCP connections closed, by the node proxy');
    this.tcpSent = tcp('istio_tcp_sent_bytes_total', 'Bytes sent to the client side of a TCP connection');
    this.tcpReceived = tcp('istio_tcp_received_bytes_total', 'Bytes received from the client side of a TCP connection');
    this.requests = new RequestMetrics(this.registry);
    this.httpEngine = new Counter({
      name: 'nodemesh_http1_connections_total',
      help: "HTTP/1.1 connections read per request, by side (client: routed on the caller's node; server: authorized on the callee's) and what served them: engine=addon (native/src/http1.cc) or engine=node (node:http, from the first request that needs it); why says why node:http took one (connect: a CONNECT request, http1.0, no_addon, no_fd). A connection handed over is counted under both.",
      labelNames: ['side', 'engine', 'why'],
      registers,
    });
    this.http2Engine = new Counter({
      name: 'nodemesh_http2_connections_total',
      help: "HTTP/2 (h2c, gRPC) connections, by side and what served them: engine=addon (native/src/h2.cc) or engine=node (node:http2); why says why node:http2 took one (no_addon; no_fd: not a socket, or no fd left for the engine's copy).",
      labelNames: ['side', 'engine', 'why'],
      registers,
    });
    this.sniffed = new Counter({ name: 'nodemesh_protocol_sniffed_total', help: 'Connections into a port that says no protocol and has request-level config, by what their first bytes said (http1, http2, opaque: anything else, or nothing within 100 ms)', labelNames: ['protocol'], registers });
    this.httpUnread = new Counter({
      name: 'nodemesh_http_unread_requests_total',
      help: "HTTP requests (HTTP/1.1 and HTTP/2) the destination's engine passed to the application without JS reading them: nothing in the config decides per request on their connection (no AuthorizationPolicy that reads requests, no local rate limit, no access log), and their path needs no normalizing",
      registers,
    });
    this.httpRouted = new Counter({
      name: 'nodemesh_http_engine_routed_requests_total',
      help: "HTTP/2 requests the source's engine routed without JS reading them: the rule they matched only splits by weight (no filter, retry, timeout, fault or mirror), and their backends need no consistent hashing, least-request picks or circuit-breaker limits",
      registers,
    });
    this.httpRefused = new Counter({ name: 'nodemesh_http_refused_total', help: 'HTTP requests refused before routing, by reason (the parser\'s error code, such as HPE_INVALID_HEADER_TOKEN or HPE_HEADER_OVERFLOW)', labelNames: ['reason'], registers });
    this.httpRetries = new Counter({ name: 'nodemesh_http_retries_total', help: 'Requests sent again by a route\'s retry (result retried), or not because the Service\'s retry budget was spent (budget_exhausted), by backend Service', labelNames: ['service', 'result'], registers });
    this.httpMirrors = new Counter({ name: 'nodemesh_http_mirrored_total', help: 'Copies of requests sent by a route\'s RequestMirror, by mirror Service and result (sent: answered; failed; no_endpoint; body_too_large: over 64 KiB, not copied)', labelNames: ['service', 'result'], registers });
    this.refused = new Counter({ name: 'nodemesh_connections_refused_total', help: 'Captured connections the proxy refused, by reason', labelNames: ['direction', 'reason'], registers });
    this.proxied = new Counter({
      name: 'nodemesh_proxied_connections_total',
      help: 'Connections the proxy relayed, by path: same_node (straight into a local pod), outbound (out of the source pod), inbound (into the destination pod)',
      labelNames: ['path'],
      registers,
    });
    this.ejections = new Counter({ name: 'nodemesh_outlier_ejections_total', help: 'Endpoints ejected by outlier detection (TrafficPolicy outlierDetection: consecutive connect errors, or on HTTP routes consecutive 5xx or gateway-error answers), by Service', labelNames: ['service'], registers });
    this.connectRetries = new Counter({ name: 'nodemesh_upstream_connect_retries_total', help: 'Outbound connections retried on another endpoint after a connect error, by Service', labelNames: ['service'], registers });
    this.podsEnrolled = new Gauge({ name: 'nodemesh_pods_enrolled', help: 'Pods whose traffic this node captures', registers });
    this.podVerified = new Gauge({ name: 'nodemesh_pod_redirection_verified', help: '1 once a probe from inside the pod reached the proxy', labelNames: ['namespace', 'pod'], registers });
    this.enrollErrors = new Counter({ name: 'nodemesh_enroll_errors_total', help: 'Failed pod enrollments, by reason', labelNames: ['reason'], registers });
    this.configErrors = new Counter({ name: 'nodemesh_config_errors_total', help: 'Config object rejections, counted at every load, by kind', labelNames: ['kind'], registers });
    this.configRejected = new Gauge({ name: 'nodemesh_config_rejected_objects', help: 'Config objects rejected by the last load, by kind', labelNames: ['kind'], registers });
    this.configObjects = new Gauge({ name: 'nodemesh_config_objects', help: 'Config objects applied, by kind', labelNames: ['kind'], registers });
    this.snapshots = new Counter({ name: 'nodemesh_config_snapshots_total', help: 'Control plane snapshots, by result (applied, rejected)', labelNames: ['result'], registers });
    this.controlPlaneConnected = new Gauge({ name: 'nodemesh_control_plane_connected', help: '1 while the Discovery stream to the control plane is up', registers });
    this.captureRefused = new Counter({
      name: 'nodemesh_capture_refused_total',
      help: 'Connects the capture programs refused in the kernel (EPERM), by reason (non_tcp_stream: a stream socket that is not TCP, such as SCTP)',
      labelNames: ['reason'],
      registers,
      // Counted by the BPF programs (nm_counters); read at scrape time.
      collect() {
        this.reset();
        for (const [reason, n] of Object.entries(captureRefusals())) this.inc({ reason }, n);
      },
    });
    this.acceptErrors = new Counter({ name: 'nodemesh_accept_errors_total', help: 'Connections an in-pod listener could not accept, by errno code (EMFILE: out of file descriptors)', labelNames: ['code'], registers });
    this.relayEnds = new Counter({
      name: 'nodemesh_relay_abnormal_ends_total',
      help: 'Relayed connections that did not end by both sides closing, by reason (reset, error: both peers were reset; idle_timeout; proxy_stopping)',
      labelNames: ['reason'],
      registers,
    });
    this.heldForConfig = new Counter({ name: 'nodemesh_connections_held_for_config_total', help: "Outbound connections that waited for their pod's config (a new pod, or an agent that just started)", registers });
    this.tunnelsOpened = new Counter({ name: 'nodemesh_hbone_tunnels_opened_total', help: 'HBONE tunnels (mutual TLS + HTTP/2 connections) this node opened to other nodes\' pods; connections reuse them otherwise', registers });
    this.tunnelRefused = new Counter({
      name: 'nodemesh_hbone_refused_total',
      help: 'Tunnels and tunnelled CONNECTs this node refused, by reason (tls_handshake, h2_handshake, h2_error, ping_timeout: no answer to the server pings, as after an invalid frame, bad_request, authority_mismatch, proxy_port, no_identity, trust_domain, internal_error)',
      labelNames: ['reason'],
      registers,
    });
    this.certificateRequests = new Counter({
      name: 'nodemesh_certificate_requests_total',
      help: 'Workload certificate requests to the control plane CA, by result (signed, failed, bad_answer_<reason>)',
      labelNames: ['result'],
      registers,
    });
    this.certificateExpiry = new Gauge({ name: 'nodemesh_workload_certificate_expiry_timestamp_seconds', help: 'When the certificate the node holds for each identity of its pods expires (unix seconds)', labelNames: ['identity'], registers });
    this.trustedRoots = new Gauge({ name: 'nodemesh_trusted_roots', help: 'Mesh roots this node checks peer certificates against (two during a root rotation)', registers });
    this.policyDenials = new Counter({
      name: 'nodemesh_policy_denials_total',
      help: 'Connections refused by access control where the destination is served, by the policy that decided (kind, namespace/name; for not_allowed the ALLOW policies none of which matched; mesh-default for the mesh-wide mTLS mode), reason (mtls_required, denied_by_policy, not_allowed) and path (same_node, inbound, hbone)',
      labelNames: ['kind', 'policy', 'reason', 'path'],
      registers,
    });
    this.policyAudits = new Counter({ name: 'nodemesh_policy_audits_total', help: 'Connections an AUDIT AuthorizationPolicy matched, by policy (namespace/name)', labelNames: ['policy'], registers });
    this.enrollments = new Counter({
      name: 'nodemesh_pod_handovers_total',
      help: 'Pods handed over by a runtime on the enrollment socket before their command ran, by answer (enrolled, not_enrolled, failed, timeout)',
      labelNames: ['result'],
      registers,
    });
    this.mapEntries = new Gauge({
      name: 'nodemesh_bpf_map_entries',
      help: 'Entries in the BPF maps of this node',
      labelNames: ['map'],
      registers,
      // Sampled, not counted at every scrape: a scrape loop (or a pod hitting 15020) costs at
      // most one count per MAP_SAMPLE_MS, whatever its rate.
      collect() {
        const now = Date.now();
        if (!sampled || now - sampled.at >= MAP_SAMPLE_MS) sampled = { at: now, entries: mapEntries() };
        for (const [map, n] of Object.entries(sampled.entries)) this.set({ map }, n);
      },
    });
    this.channels = new Gauge({
      name: 'nodemesh_http_channels',
      help: 'In-memory channels between the addon\'s HTTP engines and HBONE streams: open (a connection holds one), unclaimed (made, not yet taken by both engines; stays 0 at rest)',
      labelNames: ['state'],
      registers,
      collect() {
        const now = channels();
        this.set({ state: 'open' }, now.open);
        this.set({ state: 'unclaimed' }, now.unclaimed);
      },
    });
    this.channelsMade = new Counter({
      name: 'nodemesh_http_channels_total',
      help: 'In-memory channels made between the addon\'s HTTP engines and HBONE streams (one per HTTP/1.1 or HTTP/2 upstream connection the client side opens in a tunnel, one per tunnelled HTTP/1.1 or HTTP/2 connection the server side serves)',
      registers,
      collect() {
        this.reset();
        this.inc(channels().made);
      },
    });
    collectDefaultMetrics({ register: this.registry, prefix: 'nodemesh_agent_' });
  }
}
