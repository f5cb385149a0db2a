// Promises that an AbortSignal or a timeout can end early.
import { TimeoutError } from "./errors.js";

export const noop = () => {};

/**
 * A promise with its settle functions. Rejecting marks it handled first, so that nobody is
 * forced to await it (a failed send is also reported by flush()).
 */
export function deferred() {
  let resolve, fail;
  const promise = new Promise((res, rej) => {
    resolve = res;
    fail = rej;
  });
  const reject = (error) => {
    promise.catch(noop);
    fail(error);
  };
  return { promise, resolve, reject };
}

/**
 * Runs start(resolve, reject) and returns its promise, rejected early with the signal's reason
 * when `signal` aborts or with a TimeoutError after `timeoutMs`; `cancel()` is then called so the
 * caller can forget the wait.
 */
export function waitFor(start, { signal, timeoutMs, what = "wait" } = {}, cancel = noop) {
  if (signal?.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    let timer;
    const onAbort = () => stop(signal.reason);
    const cleanup = () => {
      if (timer) clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    const stop = (reason) => {
      cleanup();
      cancel();
      reject(reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    if (timeoutMs !== undefined && timeoutMs !== null) {
      timer = setTimeout(() => stop(new TimeoutError(`${what} timed out after ${timeoutMs} ms`)), timeoutMs);
    }
    start(
      (value) => {
        cleanup();
        resolve(value);
      },
      (error) => {
        cleanup();
        reject(error);
      },
    );
  });
}
