// Broker addresses: "host:port", "tcp://host:port" (plain TCP) or "tls://host:port" (TLS).
export const DEFAULT_HOST = "127.0.0.1";
export const DEFAULT_PORT = 6650;

const SCHEMES = { "tcp://": false, "tls://": true };

/** "[tcp://|tls://]host[:port]" (IPv6 hosts in brackets) as {host, port, tls}. */
export function parseAddress(address) {
  let rest = String(address);
  let tls = false;
  for (const [scheme, secure] of Object.entries(SCHEMES)) {
    if (rest.startsWith(scheme)) {
      rest = rest.slice(scheme.length);
      tls = secure;
      break;
    }
  }
  let host = rest;
  let port = DEFAULT_PORT;
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(rest);
  if (bracketed) {
    host = bracketed[1];
    if (bracketed[2] !== undefined) port = Number(bracketed[2]);
  } else {
    const colon = rest.lastIndexOf(":");
    if (colon >= 0) {
      host = rest.slice(0, colon);
      const digits = rest.slice(colon + 1);
      if (!/^\d+$/.test(digits)) throw new TypeError(`bad port in broker address ${JSON.stringify(address)}`);
      port = Number(digits);
    }
  }
  if (!(port > 0 && port < 65536)) throw new TypeError(`bad port in broker address ${JSON.stringify(address)}`);
  return { host: host || DEFAULT_HOST, port, tls };
}
