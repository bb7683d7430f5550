/**
 * prom-client, loaded part by part. Its index also loads the Pushgateway client, which pulls in
 * node's https, tls, crypto and zlib: code a node agent never runs, resident in every agent
 * (bench/memory.ts measures it). The types are prom-client's own.
 */
import { createRequire } from 'node:module';

import type * as PromClient from 'prom-client';

const load = createRequire(import.meta.url);

export const Registry = load('prom-client/lib/registry') as typeof PromClient.Registry;
export type Registry = PromClient.Registry;
export const Counter = load('prom-client/lib/counter') as typeof PromClient.Counter;
export type Counter<T extends string = string> = PromClient.Counter<T>;
export const Gauge = load('prom-client/lib/gauge') as typeof PromClient.Gauge;
export type Gauge<T extends string = string> = PromClient.Gauge<T>;
export const collectDefaultMetrics = load('prom-client/lib/defaultMetrics') as typeof PromClient.collectDefaultMetrics;
export const Histogram = load('prom-client/lib/histogram') as typeof PromClient.Histogram;
export type Histogram<T extends string = string> = PromClient.Histogram<T>;
