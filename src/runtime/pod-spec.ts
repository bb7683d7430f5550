/** A local pod as the user asks for it, validated once with Kubernetes' own name rules. */
import { NodemeshError } from '../shared/errors.js';
import { DNS_SUBDOMAIN, isNodeName } from '../shared/names.js';

export interface PodSpec {
  readonly name: string;
  readonly namespace: string;
  readonly serviceAccount: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly command: ReadonlyArray<string>;
  /** The (simulated) node the pod runs on, whose agent captures it; undefined: the runtime's node. */
  readonly node: string | undefined;
}

const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const QUALIFIED_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

function invalid(field: string, message: string, spec: { name?: string; namespace?: string }): NodemeshError {
  const hint = field.startsWith('label')
    ? 'give each label as key=value with a Kubernetes label key and value, e.g. -l app=web'
    : field === 'command'
      ? 'put the command after --: nodemesh pod run --name web -- CMD ARGS'
      : `use a Kubernetes name (lowercase letters, digits, "-"), e.g. --${field} web-1`;
  return new NodemeshError('NM_ERR_POD_INVALID', `${field}: ${message}`, {
    context: { field, ...(spec.name ? { pod: spec.name } : {}), ...(spec.namespace ? { namespace: spec.namespace } : {}) },
    hint,
  });
}

function checkLabelName(field: string, value: string, spec: { name?: string; namespace?: string }): void {
  if (value.length > 63 || !DNS1123_LABEL.test(value)) {
    throw invalid(field, `"${value}" must be a DNS-1123 label: at most 63 of a-z 0-9 -, starting and ending with a letter or digit`, spec);
  }
}

/** Validates a label key (optional DNS subdomain prefix + "/" + name) and value. */
export function checkLabel(key: string, value: string, spec: { name?: string; namespace?: string } = {}): void {
  const field = `label ${key}`;
  const slash = key.indexOf('/');
  const prefix = slash >= 0 ? key.slice(0, slash) : '';
  const name = slash >= 0 ? key.slice(slash + 1) : key;
  if (slash >= 0 && (prefix.length === 0 || prefix.length > 253 || !DNS_SUBDOMAIN.test(prefix))) {
    throw invalid(field, `key prefix "${prefix}" must be a DNS subdomain (example.com/name)`, spec);
  }
  if (name.length === 0 || name.length > 63 || !QUALIFIED_NAME.test(name)) {
    throw invalid(field, `key name "${name}" must be 1-63 of A-Z a-z 0-9 - _ ., starting and ending with a letter or digit`, spec);
  }
  if (value.length > 63 || !LABEL_VALUE.test(value)) {
    throw invalid(field, `value "${value}" must be at most 63 of A-Z a-z 0-9 - _ ., starting and ending with a letter or digit`, spec);
  }
}

/** Parses `k=v` arguments of --label into a record; a repeated key is an error. */
export function parseLabels(args: ReadonlyArray<string>, spec: { name?: string; namespace?: string } = {}): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const arg of args) {
    const eq = arg.indexOf('=');
    if (eq <= 0) throw invalid('label', `"${arg}" is not key=value`, spec);
    const key = arg.slice(0, eq);
    const value = arg.slice(eq + 1);
    checkLabel(key, value, spec);
    if (key in labels) throw invalid(`label ${key}`, 'is given twice', spec);
    labels[key] = value;
  }
  return labels;
}

export function validatePodSpec(input: {
  name: string;
  namespace?: string;
  serviceAccount?: string;
  labels?: ReadonlyArray<string>;
  command: ReadonlyArray<string>;
  node?: string;
}): PodSpec {
  const namespace = input.namespace ?? 'default';
  const ids = { name: input.name, namespace };
  checkLabelName('name', input.name, ids);
  checkLabelName('namespace', namespace, ids);
  const serviceAccount = input.serviceAccount ?? 'default';
  if (serviceAccount.length > 253 || !DNS_SUBDOMAIN.test(serviceAccount)) {
    throw invalid('service-account', `"${serviceAccount}" must be a DNS subdomain`, ids);
  }
  const labels = parseLabels(input.labels ?? [], ids);
  if (input.command.length === 0 || !input.command[0]) throw invalid('command', 'no command given (nodemesh pod run ... -- CMD ARGS)', ids);
  const node = input.node;
  if (node !== undefined && !isNodeName(node)) throw invalid('node', `"${node}" must be a node name (a DNS subdomain, at most 253 characters)`, ids);
  return { name: input.name, namespace, serviceAccount, labels, command: [...input.command], node };
}
