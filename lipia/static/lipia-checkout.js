// lipia-checkout.js: pay an order with M-Pesa from the browser, and follow the payment live.
//
// A plain ES module with no dependencies (no build step): import it from lipia
// (`<lipia>/static/lipia-checkout.js`) or copy it into your app. It works against any backend
// that answers the frontend checklist's endpoints:
//
//   POST /api/payments/mpesa/initiate           {phone, amount, order_id} -> {CheckoutRequestID, ...}
//   GET  /api/payments/status/{id}/events       Server-Sent Events of the status JSON (lipia)
//   GET  /api/payments/status/{id}?wait=25      long-poll (lipia)
//   GET  /api/payments/status/{id}              the status JSON, polled every 3 seconds
//
// It follows the status by SSE, falls back to the long-poll if the stream cannot be had, and to
// plain 3-second polling if neither works; a backend that has only the polling endpoint is
// polled every 3 seconds, as the checklist's frontend does. The status JSON is read exactly as
// that frontend reads it (see readStatus).
//
//   import { pay } from "/static/lipia-checkout.js";
//   const payment = pay({ phone: "0708374149", amount: 1000, orderId: "ord_...",
//                         onSuccess: (status) => ..., onFailure: (status) => ... });
//   await payment.done;   // {outcome: "success" | "failure", status}

// The checklist's fields, in the order it reads them, and the values it knows.
const STATUS_FIELDS = [
  (body) => body.status,
  (body) => body.ResultCode,
  (body) => body.result_code,
  (body) => body.payment_status,
  (body) => (body.data || {}).status,
  (body) => (body.data || {}).ResultCode,
  (body) => (body.data || {}).result_code,
];
export const SUCCESS_VALUES = ["completed", "success", "SUCCESS", "paid", "PAID", "0"];
export const FAILURE_VALUES = ["failed", "FAILED", "cancelled", "CANCELED", "insufficient_funds", "1"];

export const POLL_INTERVAL_MS = 3000;
export const LONG_POLL_SECONDS = 25;
// A stream that has not opened by then is taken as blocked (a proxy that buffers it, a firewall).
export const SSE_OPEN_TIMEOUT_MS = 8000;

/** The status value the checklist's frontend reads: the first of its fields that is present. */
export function readStatus(body) {
  if (body === null || typeof body !== "object") return "pending";
  for (const field of STATUS_FIELDS) {
    const value = field(body);
    if (value !== undefined && value !== null) return String(value);
  }
  return "pending";
}

/** "success", "failure" or "pending" (anything the checklist does not know means: keep waiting). */
export function outcomeOf(body) {
  const value = readStatus(body);
  if (SUCCESS_VALUES.includes(value)) return "success";
  if (FAILURE_VALUES.includes(value)) return "failure";
  return "pending";
}

/** lipia's phone rules (lipia/shop/phone.py), so a form can say what is wrong before sending:
 *  {msisdn: "2547XXXXXXXX"} or {error: "a sentence"}. */
export function checkPhone(raw) {
  if (typeof raw !== "string" || raw.length > 32) {
    return { error: "Phone number must be a Kenyan mobile number such as 0712345678." };
  }
  let digits = raw.trim().replace(/[\s\-().]/g, "");
  if (digits.startsWith("+")) digits = digits.slice(1);
  if (!/^[0-9]+$/.test(digits)) {
    return { error: "Phone number may contain only digits, spaces, dashes and a leading +." };
  }
  if (digits.length === 10 && digits.startsWith("0")) digits = "254" + digits.slice(1);
  else if (digits.length === 9) digits = "254" + digits;
  if (!/^254[17][0-9]{8}$/.test(digits)) {
    return {
      error: "Phone number must be a Safaricom mobile number: 07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX.",
    };
  }
  return { msisdn: digits };
}

/** An answer of the backend that is not a success: `status` (HTTP), `body` (lipia's error
 *  envelope: `error` names it, `detail` says it), `retryAfter` in seconds when given. */
export class CheckoutError extends Error {
  constructor(status, body, retryAfter) {
    super((body && (body.detail || body.error)) || `HTTP ${status}`);
    this.name = "CheckoutError";
    this.status = status;
    this.body = body || {};
    this.retryAfter = retryAfter;
  }
}

/** The id the status endpoints take, from an initiate answer. */
export function checkoutIdOf(initiated) {
  const data = initiated.data || {};
  return initiated.CheckoutRequestID || initiated.checkout_request_id || data.CheckoutRequestID || null;
}

function newKey() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

/** POST the initiate: one M-Pesa prompt. Send the same `idempotencyKey` again (a retry after a
 *  lost answer, a reload) and the backend answers the first attempt again instead of prompting
 *  twice. Resolves to the initiate answer; rejects with a CheckoutError. */
export async function startPayment({ api = "", phone, amount, orderId, idempotencyKey, fetch = globalThis.fetch }) {
  const response = await fetch(`${api}/api/payments/mpesa/initiate`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey || newKey() },
    body: JSON.stringify({ phone, amount, order_id: orderId }),
  });
  const body = await readJson(response);
  if (!response.ok || !body || !checkoutIdOf(body)) {
    throw new CheckoutError(response.status, body, Number(response.headers.get("Retry-After")) || undefined);
  }
  return body;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/** Follow the payment `checkoutRequestId` until it succeeds or fails.
 *
 *  Options: `api` (the backend's base URL, "" for the page's own origin), `onStatus(status,
 *  transport)` for every status seen, `onSuccess(status)`, `onFailure(status)`, `transports`
 *  (default ["sse", "long-poll", "poll"]: the order to try them in), `pollIntervalMs`,
 *  `longPollSeconds`, `fetch`, `EventSource`.
 *
 *  Returns {done, stop(), transport}: `done` resolves to {outcome, status} ("success" or
 *  "failure"), or {outcome: "stopped"} after stop(); `transport` says what it follows by now. */
export function followPayment(checkoutRequestId, options = {}) {
  const {
    api = "",
    onStatus = () => {},
    onSuccess = () => {},
    onFailure = () => {},
    transports = ["sse", "long-poll", "poll"],
    pollIntervalMs = POLL_INTERVAL_MS,
    longPollSeconds = LONG_POLL_SECONDS,
    fetch = globalThis.fetch,
    EventSource = globalThis.EventSource,
  } = options;
  const url = `${api}/api/payments/status/${encodeURIComponent(checkoutRequestId)}`;
  const stopped = new AbortController();
  const handle = { transport: null, stop: () => stopped.abort(), done: null };

  // {outcome, status} once the payment is final, else null.
  function seen(status) {
    onStatus(status, handle.transport);
    const outcome = outcomeOf(status);
    return outcome === "pending" ? null : { outcome, status };
  }

  function bySse() {
    return new Promise((resolve) => {
      let opened = false;
      const source = new EventSource(`${url}/events`);
      const give = (result) => {
        clearTimeout(watchdog);
        source.close();
        resolve(result);
      };
      // Blocked somewhere on the way: the stream never opens.
      const watchdog = setTimeout(() => give(null), SSE_OPEN_TIMEOUT_MS);
      stopped.signal.addEventListener("abort", () => give(null));
      source.onopen = () => {
        opened = true;
        clearTimeout(watchdog);
      };
      source.onmessage = (event) => {
        let status;
        try {
          status = JSON.parse(event.data);
        } catch {
          return;
        }
        const result = seen(status);
        if (result) give(result);
      };
      source.onerror = () => {
        // CLOSED: refused (not found, too many streams, a 204 after the final status) or not an
        // event stream at all. Reconnecting after it had opened is EventSource's own business.
        if (source.readyState === EventSource.CLOSED || !opened) give(null);
      };
    });
  }

  async function byPolling(wait) {
    const query = wait ? `?wait=${longPollSeconds}` : "";
    while (!stopped.signal.aborted) {
      const started = Date.now();
      let pause = pollIntervalMs;
      try {
        const response = await fetch(url + query, { signal: stopped.signal, cache: "no-store" });
        if (wait && response.status === 429) return null; // no room for one more waiting client
        if (response.status === 429) {
          pause = Math.max(pause, (Number(response.headers.get("Retry-After")) || 0) * 1000);
        } else {
          const status = await readJson(response);
          if (status) {
            const result = seen(status);
            if (result) return result;
          }
        }
      } catch (error) {
        if (stopped.signal.aborted) break;
        if (wait) return null; // the long-poll does not get through: plain polling will
      }
      // A long-poll answers a pending status early only when it changed; a backend that ignores
      // `wait` answers at once every time: never ask more often than the polling interval then.
      const elapsed = Date.now() - started;
      if (!wait || elapsed < (longPollSeconds * 1000) / 2) await sleep(pause - elapsed, stopped.signal);
    }
    return null;
  }

  handle.done = (async () => {
    for (const transport of transports) {
      if (stopped.signal.aborted) break;
      if (transport === "sse" && typeof EventSource !== "function") continue;
      handle.transport = transport;
      const result =
        transport === "sse" ? await bySse() : await byPolling(transport === "long-poll");
      if (result) {
        stopped.abort();
        (result.outcome === "success" ? onSuccess : onFailure)(result.status);
        return result;
      }
    }
    return { outcome: "stopped" };
  })();
  return handle;
}

/** Start a payment and follow it: startPayment's options plus followPayment's. Returns
 *  followPayment's handle, whose `done` rejects with a CheckoutError if the initiate was refused;
 *  `onStarted(initiated)` is called with the initiate answer first. */
export function pay(options) {
  const { onStarted = () => {} } = options;
  let follower = null;
  const handle = {
    get transport() {
      return follower ? follower.transport : null;
    },
    stop: () => follower && follower.stop(),
    done: null,
  };
  handle.done = startPayment(options).then((initiated) => {
    onStarted(initiated);
    follower = followPayment(checkoutIdOf(initiated), options);
    return follower.done;
  });
  return handle;
}
