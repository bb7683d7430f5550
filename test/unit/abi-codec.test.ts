import assert from 'node:assert/strict';
import { test } from 'node:test';

import { decodeAddr, decodeOrigKey, encodeAddr, encodeListenerKey, encodeOrigKey, LAYOUTS } from '../../src/datapath/abi.js';
import { ipv6Bytes, ipv6Text } from '../../src/shared/address.js';

test('nm_addr round-trips IPv4 and IPv6 in network byte order', () => {
  const v4 = encodeAddr({ family: 4, address: '10.96.0.10', port: 80 });
  assert.equal(v4.length, LAYOUTS.nm_addr.size);
  assert.deepEqual([...v4.subarray(8, 12)], [10, 96, 0, 10]);
  assert.deepEqual([...v4.subarray(4, 6)], [0, 80], 'port is big-endian as the kernel stores it');
  assert.deepEqual(decodeAddr(v4), { family: 4, address: '10.96.0.10', port: 80 });

  for (const address of ['fd00:96::a', '::1', '2001:db8:1:2:3:4:5:6', 'fe80::1:0:0:1']) {
    assert.deepEqual(decodeAddr(encodeAddr({ family: 6, address, port: 15001 })), { family: 6, address, port: 15001 });
  }
});

test('IPv6 text follows RFC 5952 and parses embedded IPv4', () => {
  assert.equal(ipv6Text(ipv6Bytes('fd00:0:0:0:0:0:0:a')), 'fd00::a');
  assert.equal(ipv6Text(ipv6Bytes('1:0:0:2:0:0:0:3')), '1:0:0:2::3', 'the longest zero run is compressed');
  assert.deepEqual([...ipv6Bytes('::ffff:10.0.0.1').subarray(10)], [0xff, 0xff, 10, 0, 0, 1]);
  assert.throws(() => ipv6Bytes('10.0.0.1'), RangeError);
});

test('nm_orig_key and nm_listener_key layouts', () => {
  const key = { netnsCookie: 0x1122334455667788n, port: 40000, family: 6 as const };
  const buf = encodeOrigKey(key);
  assert.equal(buf.length, LAYOUTS.nm_orig_key.size);
  assert.equal(buf.readUInt16LE(8), 40000, 'port in host byte order');
  assert.equal(buf.readUInt16LE(10), 10, 'AF_INET6');
  assert.deepEqual(decodeOrigKey(buf), key);

  const lk = encodeListenerKey({ family: 4, role: 1, address: '10.200.0.2' });
  assert.equal(lk.length, LAYOUTS.nm_listener_key.size);
  assert.deepEqual([...lk.subarray(0, 12)], [2, 0, 0, 0, 1, 0, 0, 0, 10, 200, 0, 2]);
});
