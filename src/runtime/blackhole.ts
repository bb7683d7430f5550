/**
 * A host blackhole route for a service address (design.md section 7): should capture ever miss,
 * a packet for that address is dropped on this machine instead of going out of it.
 */
import { isIPv6 } from 'node:net';

import { CommandFailed, ip } from '../shared/exec.js';

export interface Blackhole {
  release(): Promise<void>;
}

export async function holdBlackhole(address: string): Promise<Blackhole> {
  const family = isIPv6(address) ? '-6' : '-4';
  const prefix = `${address}/${isIPv6(address) ? 128 : 32}`;
  let added = false;
  try {
    await ip(family, 'route', 'add', 'blackhole', prefix);
    added = true;
  } catch (e) {
    // Already held (by another run): keep it, and leave it to its owner.
    if (!(e instanceof CommandFailed && /File exists/.test(e.stderr))) throw e;
  }
  return {
    release: async () => {
      if (added) await ip(family, 'route', 'del', 'blackhole', prefix).catch(() => undefined);
    },
  };
}
