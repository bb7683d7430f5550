/** The control plane's metrics (15014), defined in one place. Labels are bounded: kinds and outcomes. */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from '../shared/prom.js';

export class ControlPlaneMetrics {
  readonly registry = new Registry();
  readonly connectedAgents: Gauge;
  readonly pushes: Counter<'type'>;
  readonly pushSeconds: Histogram;
  readonly acks: Counter<'result'>;
  readonly configErrors: Counter<'kind'>;
  readonly configRejected: Gauge<'kind'>;
  readonly configObjects: Gauge<'kind'>;
  readonly configWarnings: Gauge;
  readonly streamErrors: Counter<'reason'>;
  readonly configVersion: Gauge;
  readonly certificates: Counter<'result'>;
  readonly caReloads: Counter<'result'>;
  readonly caSecret: Counter<'result'>;
  readonly podReports: Counter<'result'>;

  constructor() {
    const registers = [this.registry];
    this.connectedAgents = new Gauge({ name: 'nodemesh_cp_connected_agents', help: 'Agents with an open Discovery stream', registers });
    this.pushes = new Counter({ name: 'nodemesh_cp_pushes_total', help: 'Config messages sent to agents, by type (snapshot, delta)', labelNames: ['type'], registers });
    this.pushSeconds = new Histogram({
      name: 'nodemesh_cp_push_seconds',
      help: 'From a config change to the agent acknowledging it (propagation time per agent)',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    });
    this.acks = new Counter({ name: 'nodemesh_cp_acks_total', help: 'Agent answers to pushes, by result (ack, nack)', labelNames: ['result'], registers });
    this.configErrors = new Counter({ name: 'nodemesh_cp_config_errors_total', help: 'Config object rejections, counted at every read, by kind', labelNames: ['kind'], registers });
    this.configRejected = new Gauge({ name: 'nodemesh_cp_config_rejected_objects', help: 'Config objects rejected by the last read, by kind', labelNames: ['kind'], registers });
    this.configObjects = new Gauge({ name: 'nodemesh_cp_config_objects', help: 'Config objects served, by kind', labelNames: ['kind'], registers });
    this.configWarnings = new Gauge({ name: 'nodemesh_cp_config_warnings', help: 'Valid config objects that do not fit the rest (e.g. a TrafficPolicy for a missing Service), from the last read', registers });
    this.streamErrors = new Counter({ name: 'nodemesh_cp_stream_errors_total', help: 'Discovery streams ended by an error, by reason', labelNames: ['reason'], registers });
    this.configVersion = new Gauge({ name: 'nodemesh_cp_config_version', help: 'The current config version (unix ms based, monotonic)', registers });
    this.certificates = new Counter({
      name: 'nodemesh_cp_certificate_requests_total',
      help: 'Certificates.Sign requests, by result: signed, or why not (malformed, signature, key_algorithm, san, identity, trust_domain, not_on_node, unauthenticated, node_mismatch, rate_limited, ...)',
      labelNames: ['result'],
      registers,
    });
    this.caReloads = new Counter({ name: 'nodemesh_cp_ca_reloads_total', help: 'Loads of a changed CA folder (a root rotation step), by result: loaded, failed (the CA kept what it had)', labelNames: ['result'], registers });
    this.caSecret = new Counter({
      name: 'nodemesh_cp_ca_secret_syncs_total',
      help: 'The CA Secret (--ca-secret) and the trusted roots ConfigMap, by result: stored (a created root kept), restored (the CA folder written from the Secret), failed (tried again; the CA keeps what it has)',
      labelNames: ['result'],
      registers,
    });
    this.podReports = new Counter({
      name: 'nodemesh_cp_pod_reports_total',
      help: 'Pod reports of agents: applied, delayed (rate limit), and entries dropped by reason (invalid, duplicate_uid, address_taken, address_out_of_range, name_taken)',
      labelNames: ['result'],
      registers,
    });
    collectDefaultMetrics({ register: this.registry, prefix: 'nodemesh_cp_' });
  }
}
