// The checkout page: menu and cart, the phone, the M-Pesa prompt, the outcome.
// It pays through lipia-checkout.js, exactly as a frontend team's app would.
import { CheckoutError, checkPhone, checkoutIdOf, followPayment, startPayment } from "./lipia-checkout.js";

const API = ""; // this page is served by lipia itself
const ATTEMPT_KEY = "lipia-checkout-attempt";
const $ = (id) => document.getElementById(id);

let lastAttempt = {};

const state = {
  menu: null,
  cart: new Map(), // menu item id -> quantity
  order: null, // {orderId, total, cartKey} once the cart became an order
  follower: null,
  countdown: null,
};

const promptSeconds = Number(document.querySelector('meta[name="lipia-prompt-seconds"]').content) || 60;

function money(amount) {
  return `KES ${String(amount).replace(/\B(?=(\d{3})+(?!\d))/g, ",")}`;
}

function localPhone(msisdn) {
  const local = `0${msisdn.slice(3)}`;
  return `${local.slice(0, 4)} ${local.slice(4, 7)} ${local.slice(7)}`;
}

function announce(text) {
  // Cleared first, so the same sentence twice is still read out.
  $("announcer").textContent = "";
  setTimeout(() => {
    $("announcer").textContent = text;
  }, 50);
}

function show(screen) {
  for (const id of ["order-screen", "waiting-screen", "outcome-screen"]) $(id).hidden = id !== screen;
  const heading = $(screen).querySelector("h2");
  heading.focus();
}

// -- the attempt in progress survives a reload (same tab), so a reload never prompts twice ------

function saveAttempt(attempt) {
  sessionStorage.setItem(ATTEMPT_KEY, JSON.stringify(attempt));
}

function loadAttempt() {
  try {
    return JSON.parse(sessionStorage.getItem(ATTEMPT_KEY) || "null");
  } catch {
    return null;
  }
}

function clearAttempt() {
  sessionStorage.removeItem(ATTEMPT_KEY);
}

// -- menu and cart ------------------------------------------------------------------------------

function cartKey() {
  return JSON.stringify([...state.cart.entries()].filter(([, qty]) => qty > 0).sort());
}

function cartTotal() {
  let total = 0;
  for (const [id, qty] of state.cart) total += state.menu.items.find((item) => item.id === id).price * qty;
  return total;
}

function renderMenu(menu) {
  $("restaurant").textContent = menu.restaurant || "Checkout";
  document.title = `Checkout · ${menu.restaurant || "lipia"}`;
  const container = $("menu");
  for (const category of menu.categories) {
    const items = menu.items.filter((item) => item.category === category.id);
    if (!items.length) continue;
    const section = document.createElement("section");
    section.className = "category";
    const title = document.createElement("h3");
    title.id = `category-${category.id}`;
    title.textContent = category.name;
    section.setAttribute("aria-labelledby", title.id);
    const list = document.createElement("ul");
    list.className = "items";
    for (const item of items) list.append(renderItem(item));
    section.append(title, list);
    container.append(section);
  }
  $("menu-loading").hidden = true;
}

function renderItem(item) {
  const line = document.createElement("li");
  line.className = "item";
  line.dataset.item = item.id;
  const name = document.createElement("span");
  name.className = "item-name";
  name.textContent = item.name;
  const description = document.createElement("p");
  description.className = "item-desc";
  description.textContent = item.description || "";
  const price = document.createElement("span");
  price.className = "item-price";
  price.textContent = money(item.price);
  const actions = document.createElement("div");
  actions.className = "item-actions";
  if (!item.available) {
    const soldOut = document.createElement("span");
    soldOut.className = "sold-out";
    soldOut.textContent = "Sold out";
    actions.append(soldOut);
  } else {
    const less = document.createElement("button");
    less.type = "button";
    less.textContent = "−";
    less.setAttribute("aria-label", `Remove one ${item.name}`);
    less.disabled = true;
    less.dataset.action = "remove";
    const qty = document.createElement("span");
    qty.className = "qty";
    qty.textContent = "0";
    qty.setAttribute("aria-hidden", "true");
    const more = document.createElement("button");
    more.type = "button";
    more.textContent = "+";
    more.setAttribute("aria-label", `Add one ${item.name}, ${money(item.price)}`);
    more.dataset.action = "add";
    less.addEventListener("click", () => changeQuantity(item, -1));
    more.addEventListener("click", () => changeQuantity(item, 1));
    actions.append(less, qty, more);
  }
  line.append(name, description, price, actions);
  return line;
}

function changeQuantity(item, delta) {
  const qty = Math.max(0, (state.cart.get(item.id) || 0) + delta);
  if (qty) state.cart.set(item.id, qty);
  else state.cart.delete(item.id);
  const line = document.querySelector(`[data-item="${item.id}"]`);
  line.querySelector(".qty").textContent = String(qty);
  line.querySelector('[data-action="remove"]').disabled = qty === 0;
  renderCart();
  announce(`${item.name}: ${qty} in your order. Total ${money(cartTotal())}.`);
}

function renderCart() {
  const lines = $("cart-lines");
  lines.replaceChildren();
  for (const [id, qty] of state.cart) {
    const item = state.menu.items.find((candidate) => candidate.id === id);
    const line = document.createElement("li");
    const what = document.createElement("span");
    what.textContent = `${qty} × ${item.name}`;
    const cost = document.createElement("span");
    cost.textContent = money(item.price * qty);
    line.append(what, cost);
    lines.append(line);
  }
  $("cart-empty").hidden = state.cart.size > 0;
  $("cart-link").hidden = state.cart.size === 0;
  $("cart-link-total").textContent = `${money(cartTotal())}, pay with M-Pesa`;
  $("cart-total").textContent = money(cartTotal());
  $("pay").textContent = state.cart.size ? `Pay ${money(cartTotal())} with M-Pesa` : "Pay with M-Pesa";
}

// -- the phone ----------------------------------------------------------------------------------

function phoneProblem(text) {
  const input = $("phone");
  const error = $("phone-error");
  if (text) {
    error.textContent = text;
    error.hidden = false;
    input.setAttribute("aria-invalid", "true");
  } else {
    error.textContent = "";
    error.hidden = true;
    input.removeAttribute("aria-invalid");
  }
}

function formProblem(text) {
  $("form-error").textContent = text || "";
  $("form-error").hidden = !text;
}

// -- paying -------------------------------------------------------------------------------------

async function createOrder() {
  const key = cartKey();
  if (state.order && state.order.cartKey === key) return state.order;
  const items = [...state.cart.entries()].map(([id, qty]) => ({ menu_item_id: id, quantity: qty }));
  const response = await fetch(`${API}/api/orders`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ items }),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new CheckoutError(response.status, body);
  state.order = { orderId: body.order_id, total: body.total, cartKey: key };
  return state.order;
}

async function onPay(event) {
  event.preventDefault();
  formProblem("");
  if (!state.cart.size) {
    formProblem("Add something from the menu first.");
    return;
  }
  const checked = checkPhone($("phone").value);
  if (checked.error) {
    phoneProblem(checked.error);
    $("phone").focus();
    return;
  }
  phoneProblem("");
  $("pay").disabled = true;
  try {
    const order = await createOrder();
    const attempt = {
      orderId: order.orderId,
      total: order.total,
      cartKey: order.cartKey,
      cart: [...state.cart.entries()],
      msisdn: checked.msisdn,
      key: crypto.randomUUID(),
      startedAt: Date.now(),
      checkoutId: null,
    };
    saveAttempt(attempt);
    await begin(attempt);
  } catch (error) {
    refused(error);
  } finally {
    $("pay").disabled = false;
  }
}

// Sends the initiate (again, with the same Idempotency-Key, after a reload: the first answer comes
// back, never a second prompt) and follows the payment.
async function begin(attempt) {
  if (!attempt.checkoutId) {
    const initiated = await startPayment({
      api: API,
      phone: attempt.msisdn,
      amount: attempt.total,
      orderId: attempt.orderId,
      idempotencyKey: attempt.key,
    });
    attempt.checkoutId = checkoutIdOf(initiated);
    saveAttempt(attempt);
  }
  follow(attempt);
}

function refused(error) {
  clearAttempt();
  if (!(error instanceof CheckoutError)) {
    formProblem("lipia could not be reached. Check your connection and try again.");
    return;
  }
  const name = error.body.error;
  if (name === "InvalidPhone") {
    phoneProblem(error.body.detail);
    $("phone").focus();
  } else if (name === "OrderAlreadyPaid") {
    outcome({ status: "completed", reason: null }, { alreadyPaid: true });
  } else if (name === "PaymentUnderReview") {
    outcome({ status: "failed", reason: "needs_review" }, {});
  } else {
    const later = error.retryAfter ? ` Try again in ${error.retryAfter} seconds.` : "";
    formProblem(`${error.body.detail || "The payment could not be started."}${later}`);
  }
}

function follow(attempt) {
  lastAttempt = attempt; // "Check again" (under review) follows it once more
  $("waiting-phone").textContent = localPhone(attempt.msisdn);
  $("waiting-amount").textContent = money(attempt.total);
  $("waiting-note").textContent =
    "This page updates by itself as soon as M-Pesa answers. Do not pay again.";
  show("waiting-screen");
  announce(`M-Pesa prompt sent to ${localPhone(attempt.msisdn)}. Enter your M-Pesa PIN on your phone.`);
  startCountdown(attempt.startedAt);
  state.follower = followPayment(attempt.checkoutId, { api: API });
  document.body.dataset.transport = "";
  const transportShown = setInterval(() => {
    document.body.dataset.transport = state.follower.transport || "";
  }, 200);
  state.follower.done.then((result) => {
    clearInterval(transportShown);
    document.body.dataset.transport = state.follower.transport || "";
    if (result.outcome === "stopped") return;
    clearAttempt();
    outcome(result.status, { attempt });
  });
}

function startCountdown(startedAt) {
  clearInterval(state.countdown);
  const tick = () => {
    const left = Math.max(0, Math.ceil(promptSeconds - (Date.now() - startedAt) / 1000));
    $("countdown").textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    if (left === 0) {
      clearInterval(state.countdown);
      $("waiting-note").textContent =
        "The prompt has closed on your phone. Waiting for M-Pesa's answer; do not pay again.";
    }
  };
  tick();
  state.countdown = setInterval(tick, 1000);
}

// -- the outcome --------------------------------------------------------------------------------

const FAILURES = {
  cancelled: ["Payment cancelled", "You cancelled the M-Pesa prompt. Nothing was charged."],
  insufficient_funds: [
    "Not enough money on M-Pesa",
    "Your M-Pesa balance is too low for this payment. Nothing was charged. Top up, or pay from another number.",
  ],
  timeout: ["No answer from your phone", "The M-Pesa prompt was not answered in time. Nothing was charged."],
  wrong_pin: ["Wrong M-Pesa PIN", "The M-Pesa PIN was wrong, so nothing was charged."],
  expired: [
    "The prompt expired",
    "The M-Pesa prompt expired before it was answered. If M-Pesa took the money after all, your order will show as paid.",
  ],
  limit: ["M-Pesa declined the payment", "M-Pesa declined the payment because of a transaction limit."],
  unknown_payment: ["Payment not found", "We could not find this payment. Please try again."],
};
const UNDER_REVIEW = [
  "We are checking your payment",
  "We could not confirm this payment automatically. Please do not pay again: our staff will check it " +
    "with M-Pesa. If the money left your M-Pesa account, your order will be marked as paid; if it did " +
    "not, you can pay again once it has been checked. Keep your M-Pesa SMS.",
];

function outcome(status, { attempt, alreadyPaid } = {}) {
  clearInterval(state.countdown);
  const screen = $("outcome-screen");
  const paid = status.status === "completed";
  const review = status.reason === "needs_review" && !paid;
  let title;
  let message;
  if (paid) {
    title = alreadyPaid ? "Already paid" : "Payment received";
    message = alreadyPaid
      ? "This order is already paid: nothing more to do."
      : "Thank you! Your order is paid.";
    if (status.reason === "needs_review") message += " Our staff will double-check one detail.";
  } else if (review) {
    [title, message] = UNDER_REVIEW;
  } else {
    const known = FAILURES[status.reason] || FAILURES[status.status];
    [title, message] = known || ["Payment not completed", status.message || "The payment did not go through."];
  }
  screen.className = `screen ${paid ? "outcome-success" : "outcome-failure"}`;
  screen.dataset.outcome = paid ? "success" : review ? "review" : status.reason || status.status;
  $("outcome-title").textContent = title;
  $("outcome-message").textContent = message;
  const receipt = paid ? status.mpesa_receipt_number : null;
  $("receipt").textContent = receipt || "";
  $("receipt-line").hidden = !receipt;
  const orderId = (attempt && attempt.orderId) || (state.order && state.order.orderId);
  $("order-line").textContent = orderId ? `Order ${orderId}` : "";
  $("retry").hidden = paid || review;
  $("check-again").hidden = !review;
  show("outcome-screen");
  announce(`${title}. ${message}${receipt ? ` M-Pesa receipt ${receipt}.` : ""}`);
}

function retry() {
  show("order-screen");
  $("phone").focus();
  $("phone").select();
}

function checkAgain() {
  if (lastAttempt.checkoutId) follow(lastAttempt);
}

function newOrder() {
  clearAttempt();
  state.cart.clear();
  state.order = null;
  for (const line of document.querySelectorAll(".item")) {
    const qty = line.querySelector(".qty");
    if (qty) qty.textContent = "0";
    const less = line.querySelector('[data-action="remove"]');
    if (less) less.disabled = true;
  }
  renderCart();
  show("order-screen");
}

async function main() {
  $("pay-form").addEventListener("submit", onPay);
  $("phone").addEventListener("blur", (event) => {
    // Not when leaving for the Pay button: the message would push the button away from under the
    // pointer before the click lands (the submit checks the number anyway).
    if (event.relatedTarget === $("pay")) return;
    if ($("phone").value) phoneProblem(checkPhone($("phone").value).error);
  });
  $("phone").addEventListener("input", () => {
    if ($("phone").getAttribute("aria-invalid") && !checkPhone($("phone").value).error) phoneProblem("");
  });
  $("retry").addEventListener("click", retry);
  $("check-again").addEventListener("click", checkAgain);
  $("new-order").addEventListener("click", newOrder);

  const response = await fetch(`${API}/api/menu`);
  state.menu = await response.json();
  renderMenu(state.menu);

  const attempt = loadAttempt();
  if (attempt) {
    // Reloaded while paying: the same payment, never a second prompt.
    for (const [id, qty] of attempt.cart || []) state.cart.set(id, qty);
    state.order = { orderId: attempt.orderId, total: attempt.total, cartKey: attempt.cartKey };
    for (const [id, qty] of state.cart) {
      const line = document.querySelector(`[data-item="${id}"]`);
      if (!line) continue;
      line.querySelector(".qty").textContent = String(qty);
      line.querySelector('[data-action="remove"]').disabled = false;
    }
    $("phone").value = localPhone(attempt.msisdn);
    renderCart();
    try {
      await begin(attempt);
    } catch (error) {
      show("order-screen");
      refused(error);
    }
  } else {
    renderCart();
  }
  document.body.dataset.ready = "true";
}

main().catch(() => {
  $("menu-loading").textContent = "The menu could not be loaded. Reload the page to try again.";
});
