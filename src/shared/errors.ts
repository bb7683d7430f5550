/**
 * Every error nodemesh reports, with a stable code (the undici pattern). docs/errors.md lists the
 * same codes with what the operator should do; test/unit/errors.test.ts keeps the two in step.
 */

export const ERROR_CODES = {
  NM_ERR_NOT_ROOT: 'nodemesh needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF)',
  NM_ERR_KERNEL_TOO_OLD: 'the kernel is older than the minimum nodemesh supports (5.15)',
  NM_ERR_NO_CGROUP2: 'no cgroup v2 hierarchy is mounted',
  NM_ERR_NO_KUBEPODS: 'no kubelet pod cgroups under the cgroup root',
  NM_ERR_NO_BPF: 'the bpf() system call is missing or not permitted',
  NM_ERR_BPFFS: 'the BPF filesystem is not mounted and could not be mounted',
  NM_ERR_NATIVE_MISSING: 'nodemesh is not built: its JavaScript, the native addon, the BPF objects or the generated CRD validators',
  NM_ERR_TOOL_MISSING: 'a system tool nodemesh runs (iproute2) is not installed',
  NM_ERR_DATAPATH: 'a kernel call of the datapath (BPF, socket, namespace) failed',
  NM_ERR_BPF_LOAD: 'the kernel refused to load a BPF object (verifier or missing feature)',
  NM_ERR_ABI_MISMATCH: 'a BPF map does not have the layout this build expects',
  NM_ERR_INVALID_ARGUMENT: 'a command-line argument or option is not valid',
  NM_ERR_POD_INVALID: 'a pod name, namespace, service account or label is not valid',
  NM_ERR_POD_EXISTS: 'a pod with that namespace and name already exists',
  NM_ERR_POD_NOT_FOUND: 'no pod with that name exists',
  NM_ERR_POD_COMMAND: "the pod's command could not be started",
  NM_ERR_POD_SETUP: 'creating the pod (namespace, veth, cgroup) failed; everything made was removed',
  NM_ERR_POD_CIDR_EXHAUSTED: 'the local pod subnet has no free address',
  NM_ERR_STATE: 'the local runtime state folder, or a record in it, cannot be read',
  NM_ERR_AGENT_UNREACHABLE: "the node agent's admin API does not answer",
  NM_ERR_CONTROL_PLANE_UNREACHABLE: "the control plane's HTTP port (15014) does not answer",
  NM_ERR_LOCK_TIMEOUT: 'another nodemesh process holds the runtime lock for too long',
  NM_ERR_DEMO: 'the demo could not start one of its parts (a port taken, a process that exited)',
  NM_ERR_AGENT_TOKENS: 'the control plane\'s agent token file cannot be read or has a bad line',
  NM_ERR_KUBE_CONFIG: 'the Kubernetes client config (kubeconfig or in-cluster service account) cannot be loaded',
  NM_ERR_CONFIG_DIR: 'the config folder (--config-dir), or a file in it, is missing or cannot be read',
  NM_ERR_PORT_IN_USE: 'a port nodemesh was told to listen on is taken by another process',
  NM_ERR_TOKEN_FILE: "the agent's control plane token file (--token-file) cannot be read or is empty",
  NM_ERR_INTERNAL: 'an error nodemesh did not expect (a bug): the message is all it knows',
  NM_ERR_ENROLL_FAILED: 'the node agent refused to enroll a new pod, or the hand-over was cut off',
  NM_ERR_ENROLL_TIMEOUT: 'the node agent did not capture a new pod in time',
  NM_ERR_AGENT_RUNNING: 'another agent already serves this node',
  NM_ERR_CA: "the control plane's CA files (--ca-dir) are missing one half, unreadable, not a CA, or do not match",
  NM_ERR_CA_ROOT: "the agent's trust root (--ca-root) cannot be read or holds no certificate",
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** What an operator needs to find the failing thing: which pod, object, path, syscall. */
export interface ErrorContext {
  readonly pod?: string;
  readonly namespace?: string;
  readonly object?: string;
  readonly field?: string;
  readonly path?: string;
  /** A HOST:PORT that nodemesh listens on or connects to. */
  readonly address?: string;
  readonly syscall?: string;
  readonly errno?: number;
  readonly errnoCode?: string;
  readonly detail?: string;
}

export class NodemeshError extends Error {
  override readonly name = 'NodemeshError';
  readonly code: ErrorCode;
  readonly context: ErrorContext;
  /** One line telling the operator how to fix it, printed by the CLI under the message. */
  readonly hint: string | undefined;

  constructor(code: ErrorCode, message: string, options: { context?: ErrorContext; hint?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.context = options.context ?? {};
    this.hint = options.hint;
  }

  toJSON(): Record<string, unknown> {
    return { code: this.code, message: this.message, ...this.context, ...(this.hint ? { hint: this.hint } : {}) };
  }
}

/** The shape of errors thrown by the addon and by node's own system calls. */
export interface SystemErrorLike {
  readonly message: string;
  readonly code?: string;
  readonly errno?: number;
  readonly syscall?: string;
  readonly path?: string;
  readonly detail?: string;
}

export function isSystemError(e: unknown): e is SystemErrorLike & Error {
  return e instanceof Error && typeof (e as { code?: unknown }).code === 'string';
}

export function isNodemeshError(e: unknown, code?: ErrorCode): e is NodemeshError {
  return e instanceof NodemeshError && (code === undefined || e.code === code);
}
