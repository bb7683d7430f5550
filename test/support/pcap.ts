/**
 * Reads a classic pcap file (what `tcpdump -w` writes on an Ethernet link): each TCP segment's
 * ports and payload, IPv4 and IPv6. Enough for tests to ask what crossed the wire in clear.
 */
import { readFile } from 'node:fs/promises';

export interface Segment {
  readonly srcPort: number;
  readonly dstPort: number;
  readonly payload: Buffer;
}

export async function readPcap(path: string): Promise<Segment[]> {
  const data = await readFile(path);
  if (data.length < 24) return [];
  const magic = data.readUInt32LE(0);
  const le = magic === 0xa1b2c3d4 || magic === 0xa1b23c4d;
  const u32 = (o: number): number => (le ? data.readUInt32LE(o) : data.readUInt32BE(o));
  const segments: Segment[] = [];
  for (let off = 24; off + 16 <= data.length; ) {
    const captured = u32(off + 8);
    const frame = data.subarray(off + 16, off + 16 + captured);
    off += 16 + captured;
    if (frame.length < 14) continue;
    const etherType = frame.readUInt16BE(12);
    let ip = frame.subarray(14);
    let proto: number;
    if (etherType === 0x0800) {
      proto = ip[9] ?? 0;
      const ihl = ((ip[0] ?? 0) & 0x0f) * 4;
      ip = ip.subarray(ihl, ip.readUInt16BE(2));
    } else if (etherType === 0x86dd) {
      proto = ip[6] ?? 0;
      ip = ip.subarray(40, 40 + ip.readUInt16BE(4));
    } else continue;
    if (proto !== 6 || ip.length < 20) continue;
    const dataOffset = ((ip[12] ?? 0) >> 4) * 4;
    segments.push({ srcPort: ip.readUInt16BE(0), dstPort: ip.readUInt16BE(2), payload: ip.subarray(dataOffset) });
  }
  return segments;
}
