/** Where the build outputs of this package live, found from this file's own location. */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findPackageRoot(start: string): string {
  let dir = start;
  for (;;) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest)) {
      const pkg = JSON.parse(readFileSync(manifest, 'utf8')) as { name?: string };
      if (pkg.name === 'nodemesh') return dir;
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`nodemesh package root not found above ${start}`);
    dir = parent;
  }
}

export const PACKAGE_ROOT = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
export const NATIVE_ADDON_PATH = join(PACKAGE_ROOT, 'build', 'native', 'Release', 'nodemesh_native.node');
export const BPF_OBJECT_DIR = join(PACKAGE_ROOT, 'build', 'bpf');
export const CLI_ENTRY = join(PACKAGE_ROOT, 'bin', 'nodemesh.js');

export function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}
