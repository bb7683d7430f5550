/**
 * Who an agent is (design.md section 6: "locally with a bootstrap token file"): a file of
 * `<node> <token>` lines binds each token to one node, so an agent can only speak for the node
 * its token names. Read at every stream start, so adding a node needs no restart. Tokens are
 * compared through SHA-256 digests in constant time.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';

import { NodemeshError } from '../shared/errors.js';

const NODE_NAME = /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/;
const digest = (token: string): Buffer => createHash('sha256').update(token).digest();

/** Which node an agent's bearer token speaks for. */
export interface AgentAuthenticator {
  readonly description: string;
  /** Checked once at start: a broken setup must not start open. Returns how many identities it knows, if it can tell. */
  check(): Promise<number>;
  /** The node the token is bound to, or undefined. */
  nodeOf(token: string): Promise<string | undefined>;
}

export class AgentTokens implements AgentAuthenticator {
  constructor(readonly file: string) {}

  get description(): string {
    return `token file ${this.file}`;
  }

  /** Checks the file once (at start): a control plane with a broken token file must not start open. */
  async check(): Promise<number> {
    return (await this.read()).length;
  }

  /** The node a token is bound to, or undefined. */
  async nodeOf(token: string): Promise<string | undefined> {
    const presented = digest(token);
    let found: string | undefined;
    // Every entry is compared, whatever matched: the time taken says nothing about the token.
    for (const e of await this.read()) if (timingSafeEqual(e.digest, presented)) found ??= e.node;
    return found;
  }

  private async read(): Promise<Array<{ node: string; digest: Buffer }>> {
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch (e) {
      throw new NodemeshError('NM_ERR_AGENT_TOKENS', `cannot read the agent token file: ${(e as Error).message}`, {
        context: { path: this.file },
        cause: e,
        hint: 'give --agent-tokens a file of "<node name> <token>" lines',
      });
    }
    const entries: Array<{ node: string; digest: Buffer }> = [];
    for (const [i, raw] of text.split('\n').entries()) {
      const line = raw.trim();
      if (line === '' || line.startsWith('#')) continue;
      const [node = '', token = '', ...rest] = line.split(/\s+/);
      if (!NODE_NAME.test(node) || token.length < 16 || rest.length > 0) {
        throw new NodemeshError('NM_ERR_AGENT_TOKENS', `line ${i + 1} of the agent token file is not "<node name> <token of 16 or more characters>"`, {
          context: { path: this.file, detail: `line ${i + 1}` },
          hint: `fix line ${i + 1}: one node name and one token of 16 or more characters, separated by a space (# starts a comment)`,
        });
      }
      entries.push({ node, digest: digest(token) });
    }
    return entries;
  }
}
