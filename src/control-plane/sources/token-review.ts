/**
 * Agents in a cluster authenticate with a projected ServiceAccount token (design.md section 6):
 * the control plane asks the API server who the token belongs to (TokenReview), accepts only the
 * agent's ServiceAccount, and takes the node from the token's pod binding
 * (`authentication.kubernetes.io/node-name`, set for pod-bound tokens since Kubernetes 1.30), so
 * an agent can speak only for the node its pod runs on. A review that does not name the audience
 * asked for is refused. Answers are kept for a minute, and reviews of tokens not in that cache are
 * limited to REVIEWS_PER_SECOND (bursts of REVIEW_BURST): a reconnect storm, or a client trying
 * tokens, does not become a TokenReview storm against the API server.
 */
import { createHash } from 'node:crypto';

import { logger } from '../../shared/log.js';
import type { AgentAuthenticator } from '../agent-tokens.js';
import type { KubeApi } from '../../kube/api.js';
import { RateLimiter } from '../../shared/rate-limit.js';

/** The audience agents' tokens are requested for (the DaemonSet's projected volume says the same). */
export const AGENT_TOKEN_AUDIENCE = 'nodemesh';
const NODE_NAME_EXTRA = 'authentication.kubernetes.io/node-name';
const log = logger('agent-auth');
const CACHE_MS = 60_000;
const MAX_CACHED = 10_000;
const REVIEWS_PER_SECOND = 10;
const REVIEW_BURST = 50;

/** TokenReviews are coming faster than the limit: the caller answers "try again" (UNAVAILABLE). */
export class ReviewRateLimited extends Error {
  constructor() {
    super(`more than ${REVIEWS_PER_SECOND} token reviews a second: not asking the API server now`);
    this.name = 'ReviewRateLimited';
  }
}

interface Review {
  status?: { authenticated?: boolean; error?: string; audiences?: string[]; user?: { username?: string; extra?: Record<string, string[]> } };
}

export class TokenReviewAuthenticator implements AgentAuthenticator {
  private readonly cache = new Map<string, { node: string | undefined; reason: string; until: number }>();
  private readonly limit: RateLimiter;

  constructor(
    private readonly api: KubeApi,
    /** "namespace/name" of the agents' ServiceAccount. */
    readonly serviceAccount: string,
    limits: { burst: number; perSecond: number } = { burst: REVIEW_BURST, perSecond: REVIEWS_PER_SECOND },
  ) {
    this.limit = new RateLimiter(limits.burst, limits.perSecond, 1);
  }

  get description(): string {
    return `TokenReview, ServiceAccount ${this.serviceAccount}`;
  }

  async check(): Promise<number> {
    return 0;
  }

  async nodeOf(token: string): Promise<string | undefined> {
    return (await this.review(token)).node;
  }

  /** The node, or undefined with the reason (for the log). */
  async review(token: string): Promise<{ node: string | undefined; reason: string }> {
    const key = createHash('sha256').update(token).digest('hex');
    const hit = this.cache.get(key);
    if (hit && hit.until > Date.now()) return hit;
    if (!this.limit.take('reviews')) throw new ReviewRateLimited();
    const answer = (await this.api.create(
      '/apis/authentication.k8s.io/v1/tokenreviews',
      { apiVersion: 'authentication.k8s.io/v1', kind: 'TokenReview', spec: { token, audiences: [AGENT_TOKEN_AUDIENCE] } },
      AbortSignal.timeout(5000),
    )) as Review;
    const result = judge(answer, this.serviceAccount);
    if (result.node === undefined) log.warn({ reason: result.reason }, 'agent token refused');
    if (this.cache.size >= MAX_CACHED) this.cache.clear();
    this.cache.set(key, { ...result, until: Date.now() + CACHE_MS });
    return result;
  }
}

function judge(review: Review, serviceAccount: string): { node: string | undefined; reason: string } {
  const s = review.status;
  if (!s?.authenticated) return { node: undefined, reason: `token not authenticated${s?.error ? `: ${s.error}` : ''}` };
  // The API server names the audiences it validated the token for: without ours, it did not.
  if (!s.audiences?.includes(AGENT_TOKEN_AUDIENCE)) return { node: undefined, reason: `the review does not name the audience ${AGENT_TOKEN_AUDIENCE}` };
  const [ns, name] = serviceAccount.split('/');
  const expected = `system:serviceaccount:${ns}:${name}`;
  if (s.user?.username !== expected) return { node: undefined, reason: `token of ${s.user?.username ?? 'nobody'}, not of ${expected}` };
  const node = s.user.extra?.[NODE_NAME_EXTRA]?.[0];
  if (!node) return { node: undefined, reason: 'token not bound to a pod on a node (no node-name in it: Kubernetes 1.30+ projected tokens carry it)' };
  return { node, reason: 'ok' };
}
