/**
 * IP addresses and socket addresses as the whole mesh writes them: the family, RFC 5952 text for
 * IPv6, host:port with brackets. Pure functions; the BPF map codecs (datapath/abi.ts), config and
 * the runtime all use these.
 */
import { BlockList, isIP, isIPv4, isIPv6 } from 'node:net';

/** "10.0.0.0/8", "fd00::/64" or a single address (a whole address block, any prefix). */
export function parseAddressBlock(text: string): { address: string; prefix: number; family: Family } | undefined {
  const [address = '', prefixText, ...rest] = text.split('/');
  const family = isIP(address);
  if (rest.length > 0 || family === 0) return undefined;
  const max = family === 4 ? 32 : 128;
  const prefix = prefixText === undefined ? max : /^[0-9]{1,3}$/.test(prefixText) ? Number(prefixText) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return undefined;
  return { address, prefix, family: family === 4 ? 4 : 6 };
}

/** A set of address ranges (v4 and v6; an IPv4-mapped address counts as its IPv4 one). */
export class AddressRanges {
  private readonly blocks = new BlockList();

  /** Throws for an entry that is not an address or CIDR block, naming it. */
  constructor(readonly cidrs: ReadonlyArray<string>) {
    for (const text of cidrs) {
      const c = parseAddressBlock(text);
      if (!c) throw new Error(`"${text}" is not an IP address or CIDR block`);
      this.blocks.addSubnet(c.address, c.prefix, c.family === 4 ? 'ipv4' : 'ipv6');
    }
  }

  has(address: string): boolean {
    const bare = address.replace(/^::ffff:/, '');
    return this.blocks.check(bare, bare.includes(':') ? 'ipv6' : 'ipv4');
  }
}

export type Family = 4 | 6;

/** A socket address as the application dialed it. */
export interface SocketAddress {
  readonly family: Family;
  readonly address: string;
  readonly port: number;
}

/** The RFC 5952 text of 16 address bytes at offset. */
export function ipv6Text(buf: Buffer, offset = 0): string {
  const groups: string[] = [];
  for (let i = 0; i < 8; i++) groups.push(buf.readUInt16BE(offset + i * 2).toString(16));
  return compressIPv6(groups);
}

/** RFC 5952 text form: the longest run of two or more zero groups becomes "::". */
function compressIPv6(groups: string[]): string {
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen && j - i >= 2) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return groups.join(':');
  return `${groups.slice(0, bestStart).join(':')}::${groups.slice(bestStart + bestLen).join(':')}`;
}

export function ipv6Bytes(address: string): Buffer {
  if (!isIPv6(address)) throw new RangeError(`not an IPv6 address: ${address}`);
  const out = Buffer.alloc(16);
  let text = address;
  // An embedded dotted quad (::ffff:1.2.3.4) becomes two hex groups.
  const quad = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (quad?.[1]) {
    const p = quad[1].split('.').map(Number);
    text = `${text.slice(0, quad.index)}${(((p[0] ?? 0) << 8) | (p[1] ?? 0)).toString(16)}:${(((p[2] ?? 0) << 8) | (p[3] ?? 0)).toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const h = head === '' ? [] : head.split(':');
  const t = tail === undefined || tail === '' ? [] : tail.split(':');
  const groups = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

/** host:port, with brackets around an IPv6 host. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export function familyOf(address: string): Family {
  if (isIPv4(address)) return 4;
  if (isIPv6(address)) return 6;
  throw new RangeError(`not an IP address: ${address}`);
}

/** Whether an address (text form) is a loopback address: 127/8 or ::1. */
export function isLoopback(host: string): boolean {
  return host.startsWith('127.') || host === '::1';
}
