/** Where the build outputs of this package live, found from this file's own location. */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findPackageRoot(start: string): string {
  let dir = start;
  for (;;) {
    // Read, not existsSync(): access() checks with the real uid and no capabilities, so a
    // process that may read the file (CAP_DAC_READ_SEARCH) would be told it is not there.
    let text: string | undefined;
    try {
      text = readFileSync(join(dir, 'package.json'), 'utf8');
    } catch {
      text = undefined;
    }
    if (text !== undefined && (JSON.parse(text) as { name?: string }).name === 'nodemesh') return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`nodemesh package root not found above ${start}`);
    dir = parent;
  }
}

export const PACKAGE_ROOT = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
export const NATIVE_ADDON_PATH = join(PACKAGE_ROOT, 'build', 'native', 'Release', 'nodemesh_native.node');
export const BPF_OBJECT_DIR = join(PACKAGE_ROOT, 'build', 'bpf');
export const CLI_ENTRY = join(PACKAGE_ROOT, 'bin', 'nodemesh.js');
/** The control plane's own state (its CA's root) unless --ca-dir says otherwise: kept across reboots, unlike /run. */
export const CONTROL_PLANE_STATE_DIR = '/var/lib/nodemesh/control-plane';

export function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}
