/** Structured logging: one pino root, a child per subsystem (the grpc-js TRACER_NAME idea). */
import { pino, type Logger } from 'pino';

export type { Logger };

const root: Logger = pino(
  {
    name: 'nodemesh',
    level: process.env['NODEMESH_LOG_LEVEL'] ?? 'info',
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
  },
  pino.destination({ fd: 2, sync: true }),
);

export function logger(subsystem: string): Logger {
  return root.child({ subsystem });
}
