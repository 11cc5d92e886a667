// A local run shaped like the official Rinha de Backend 2025 test (docs/contest.md, "The official
// run" and "Scoring"), written from that description for `benchmarks/run_contest.py`.
//
//   k6 run benchmarks/k6/contest.js                       # 550 VUs over 60 s, like the contest
//   k6 run -e MAX_REQUESTS=200 -e DURATION_SCALE=0.25 benchmarks/k6/contest.js   # a quick look
//
// Scenarios, all starting at t=0:
//   payments     VUs ramp 1 -> MAX_REQUESTS over 60 s; each posts one payment, then sleeps 1 s.
//   schedule     one VU switches the processors' delay/failure at t=1,10,20,30,40,50 s.
//   consistency  one VU compares the backend's summary with both processors' every 10 s.
// Every duration above is multiplied by DURATION_SCALE; the 1 s sleep, the 1.5 s HTTP timeout
// and the consistency window [now-15 s, now-1.5 s] are not, because they are about the
// backend's latency, not the length of the run.
//
// teardown() reads the backend's summary over the last 70 s (scaled, and never less than the
// scaled run plus 10 s) and the processors' fee rates; handleSummary() computes the score with
// the contest's formula over ALL http requests (admin calls included, as in the contest) and
// writes it as JSON to SUMMARY_JSON.
//
// Environment: BACKEND_URL, PROCESSOR_DEFAULT_URL, PROCESSOR_FALLBACK_URL, ADMIN_TOKEN,
// MAX_REQUESTS, DURATION_SCALE, P99_BUDGET_MS (threshold on p99, default 11 = no bonus left),
// MAX_INCONSISTENCIES (threshold, default 0), SUMMARY_JSON (path of the JSON result), MODE
// (`product`, or `floor` when BACKEND_URL is nginx answering by itself: a label only, the run
// is the same), HOP_OVER (`tcp` or `unix` for run_contest.py --floor-hop: a label too).

import http from 'k6/http';
import { sleep } from 'k6';
import { Counter, Gauge } from 'k6/metrics';

const BACKEND_URL = __ENV.BACKEND_URL || 'http://127.0.0.1:9999';
const PROCESSORS = {
  default: __ENV.PROCESSOR_DEFAULT_URL || 'http://127.0.0.1:8001',
  fallback: __ENV.PROCESSOR_FALLBACK_URL || 'http://127.0.0.1:8002',
};
const ADMIN_TOKEN = __ENV.ADMIN_TOKEN || '123';
const MAX_REQUESTS = positiveNumber('MAX_REQUESTS', 550);
const DURATION_SCALE = positiveNumber('DURATION_SCALE', 1);
const P99_BUDGET_MS = positiveNumber('P99_BUDGET_MS', 11);
const MAX_INCONSISTENCIES = nonNegativeNumber('MAX_INCONSISTENCIES', 0);
const SUMMARY_JSON = __ENV.SUMMARY_JSON || '';
const MODE = __ENV.MODE || 'product';
const HOP_OVER = __ENV.HOP_OVER || null;

// Fees used only if the processors' admin summary does not say (docs/contest.md: 5 % and 15 %).
const FEE_RATE_DEFAULT = { default: 0.05, fallback: 0.15 };
const AMOUNT = 19.9;
const HTTP_TIMEOUT = '1500ms';
const RUN_S = 60;
const CHECK_EVERY_S = 10;
const CHECK_FROM_AGO_MS = 15000;
const CHECK_TO_AGO_MS = 1500;
const FINAL_WINDOW_S = Math.max(70 * DURATION_SCALE, RUN_S * DURATION_SCALE + 10);
const BONUS_P99_CEILING_MS = 11;
const BONUS_PER_MS = 0.02;
const INCONSISTENCY_FINE = 0.35;

// docs/contest.md, "The official run": at `at_s`, each processor's delay (ms) and failure switch.
const SCHEDULE = [
  { at_s: 1, default: { delay_ms: 0, failure: false }, fallback: { delay_ms: 0, failure: false } },
  { at_s: 10, default: { delay_ms: 100, failure: false }, fallback: { delay_ms: 0, failure: false } },
  { at_s: 20, default: { delay_ms: 100, failure: true }, fallback: { delay_ms: 0, failure: false } },
  { at_s: 30, default: { delay_ms: 2000, failure: true }, fallback: { delay_ms: 1000, failure: true } },
  { at_s: 40, default: { delay_ms: 20, failure: false }, fallback: { delay_ms: 20, failure: false } },
  { at_s: 50, default: { delay_ms: 0, failure: false }, fallback: { delay_ms: 5000, failure: false } },
];

const paymentsAccepted = new Counter('payments_accepted');
const paymentsFailed = new Counter('payments_failed');
const inconsistencies = new Counter('inconsistencies');
// |default difference| + |fallback difference|: the stricter sum of the contest's final-round
// script, which also catches a payment booked under the wrong processor. Reported, not scored.
const inconsistenciesStrict = new Counter('inconsistencies_strict');
const consistencyChecks = new Counter('consistency_checks');
const consistencyErrors = new Counter('consistency_errors');
const adminErrors = new Counter('admin_errors');
// The step of the schedule just applied (0 = the schedule VU started): its samples carry the
// real time of every switch, which the runner uses to shade its timeline.
const scheduleStep = new Gauge('schedule_step');
const finalSummaryOk = new Gauge('final_summary_ok');
const finalRequests = {
  default: new Gauge('final_default_requests'),
  fallback: new Gauge('final_fallback_requests'),
};
const finalCents = {
  default: new Gauge('final_default_cents'),
  fallback: new Gauge('final_fallback_cents'),
};
const feeRate = { default: new Gauge('fee_rate_default'), fallback: new Gauge('fee_rate_fallback') };
// The processors' own count over the same final window: the truth the backend is judged by.
const processorRequests = {
  default: new Gauge('processor_default_requests'),
  fallback: new Gauge('processor_fallback_requests'),
};

const scaled = (seconds) => `${Math.max(1, Math.round(seconds * DURATION_SCALE * 1000))}ms`;

export const options = {
  scenarios: {
    payments: {
      executor: 'ramping-vus',
      exec: 'payments',
      startVUs: 1,
      stages: [{ duration: scaled(RUN_S), target: MAX_REQUESTS }],
      gracefulRampDown: '0s',
      gracefulStop: '5s',
    },
    schedule: {
      executor: 'per-vu-iterations',
      exec: 'processorSchedule',
      vus: 1,
      iterations: 1,
      maxDuration: scaled(RUN_S + 30),
    },
    consistency: {
      executor: 'per-vu-iterations',
      exec: 'consistencyCheck',
      vus: 1,
      iterations: Math.floor(RUN_S / CHECK_EVERY_S),
      maxDuration: scaled(RUN_S + 30),
    },
  },
  thresholds: {
    http_req_duration: [`p(99)<${P99_BUDGET_MS}`],
    inconsistencies: [`count<=${MAX_INCONSISTENCIES}`],
    // Never fails; it makes k6 compute the submetric the contest's own script takes its p99
    // from (2XX/3XX answers only), reported beside the p99 over every request.
    'http_req_duration{expected_response:true}': ['max>=0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
  setupTimeout: '30s',
  teardownTimeout: '30s',
};

function positiveNumber(name, fallback) {
  const value = nonNegativeNumber(name, fallback);
  if (value <= 0) throw new Error(`${name} must be positive, got ${__ENV[name]}`);
  return value;
}

function nonNegativeNumber(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be a number >= 0, got ${raw}`);
  return value;
}

function uuid() {
  if (typeof crypto !== 'undefined' && crypto.randomUUID) return crypto.randomUUID();
  return 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'.replace(/[xy]/g, (c) => {
    const r = (Math.random() * 16) | 0;
    return (c === 'x' ? r : (r & 0x3) | 0x8).toString(16);
  });
}

const JSON_HEADERS = { 'Content-Type': 'application/json' };
const ADMIN_HEADERS = { 'Content-Type': 'application/json', 'X-Rinha-Token': ADMIN_TOKEN };

function admin(method, processor, path, body, tagName) {
  const res = http.request(method, `${PROCESSORS[processor]}/admin/${path}`,
    body === null ? null : JSON.stringify(body),
    { headers: ADMIN_HEADERS, timeout: '5s', tags: { name: tagName } });
  if (res.status < 200 || res.status >= 300) adminErrors.add(1, { processor, path });
  return res;
}

function configure(processor, config) {
  admin('PUT', processor, 'configurations/delay', { delay: config.delay_ms }, 'admin_delay');
  admin('PUT', processor, 'configurations/failure', { failure: config.failure }, 'admin_failure');
}

function summaryQuery(fromMs, toMs) {
  return `from=${new Date(fromMs).toISOString()}&to=${new Date(toMs).toISOString()}`;
}

function parseJson(res) {
  if (res.status !== 200) return null;
  try {
    return JSON.parse(res.body);
  } catch (e) {
    return null;
  }
}

// Amounts travel as JSON decimals; money here is integer cents, as in the backend.
const toCents = (amount) => Math.round(Number(amount) * 100);

export function setup() {
  // docs/contest.md: the test purges the backend once at start and ignores failure.
  http.post(`${BACKEND_URL}/purge-payments`, null, { timeout: '5s', tags: { name: 'purge' } });
  for (const processor of Object.keys(PROCESSORS)) {
    admin('POST', processor, 'purge-payments', null, 'admin_purge');
    // A previous run may have left a processor slow or failing; start from a healthy pair.
    configure(processor, { delay_ms: 0, failure: false });
  }
  inconsistencies.add(0);  // so the threshold always has a sample to judge
  inconsistenciesStrict.add(0);
  return { startedAt: Date.now() };
}

export function payments() {
  const body = JSON.stringify({ correlationId: uuid(), amount: AMOUNT });
  const res = http.post(`${BACKEND_URL}/payments`, body, {
    headers: JSON_HEADERS, timeout: HTTP_TIMEOUT, responseType: 'none', tags: { name: 'payments' },
  });
  if (res.status >= 200 && res.status < 300) paymentsAccepted.add(1);
  else paymentsFailed.add(1);
  sleep(1);
}

export function processorSchedule() {
  const start = Date.now();
  scheduleStep.add(0);
  SCHEDULE.forEach((step, index) => {
    const waitMs = start + step.at_s * DURATION_SCALE * 1000 - Date.now();
    if (waitMs > 0) sleep(waitMs / 1000);
    configure('default', step.default);
    configure('fallback', step.fallback);
    scheduleStep.add(index + 1);
  });
}

export function consistencyCheck() {
  sleep(CHECK_EVERY_S * DURATION_SCALE);
  const now = Date.now();
  const query = summaryQuery(now - CHECK_FROM_AGO_MS, now - CHECK_TO_AGO_MS);
  const adminParams = { headers: ADMIN_HEADERS, timeout: '5s', tags: { name: 'admin_summary' } };
  const [backend, ppDefault, ppFallback] = http.batch([
    ['GET', `${BACKEND_URL}/payments-summary?${query}`, null,
      { timeout: '5s', tags: { name: 'summary' } }],
    ['GET', `${PROCESSORS.default}/admin/payments-summary?${query}`, null, adminParams],
    ['GET', `${PROCESSORS.fallback}/admin/payments-summary?${query}`, null, adminParams],
  ]).map(parseJson);
  consistencyChecks.add(1);
  if (!backend || !backend.default || !backend.fallback || !ppDefault || !ppFallback) {
    // Not a comparison: counted apart so a broken summary endpoint is seen, not hidden.
    consistencyErrors.add(1);
    return;
  }
  const differenceDefault = backend.default.totalRequests - ppDefault.totalRequests;
  const differenceFallback = backend.fallback.totalRequests - ppFallback.totalRequests;
  inconsistencies.add(Math.abs(differenceDefault + differenceFallback));
  inconsistenciesStrict.add(Math.abs(differenceDefault) + Math.abs(differenceFallback));
}

export function teardown() {
  const now = Date.now();
  const query = summaryQuery(now - FINAL_WINDOW_S * 1000, now);
  const adminParams = { headers: ADMIN_HEADERS, timeout: '5s', tags: { name: 'admin_summary' } };
  const [backend, ppDefault, ppFallback] = http.batch([
    ['GET', `${BACKEND_URL}/payments-summary?${query}`, null,
      { timeout: '5s', tags: { name: 'summary' } }],
    ['GET', `${PROCESSORS.default}/admin/payments-summary?${query}`, null, adminParams],
    ['GET', `${PROCESSORS.fallback}/admin/payments-summary?${query}`, null, adminParams],
  ]).map(parseJson);
  const processors = { default: ppDefault, fallback: ppFallback };
  for (const name of Object.keys(PROCESSORS)) {
    const reported = processors[name] && Number(processors[name].feePerTransaction);
    feeRate[name].add(Number.isFinite(reported) ? reported : FEE_RATE_DEFAULT[name]);
    if (processors[name]) processorRequests[name].add(Number(processors[name].totalRequests));
  }
  const ok = !!(backend && backend.default && backend.fallback);
  finalSummaryOk.add(ok ? 1 : 0);
  for (const name of Object.keys(PROCESSORS)) {
    finalRequests[name].add(ok ? Number(backend[name].totalRequests) : 0);
    finalCents[name].add(ok ? toCents(backend[name].totalAmount) : 0);
  }
}

// --- the score (docs/contest.md, "Scoring"); benchmarks/run_contest.py:score() is the same formula.

const round2 = (x) => Math.round(x * 100) / 100;

function score({ defaultRequests, fallbackRequests, defaultCents, fallbackCents,
  feeRateDefault, feeRateFallback, p99Ms, inconsistencyCount, accepted }) {
  const totalAmount = (defaultCents + fallbackCents) / 100;
  const fees = (defaultCents * feeRateDefault + fallbackCents * feeRateFallback) / 100;
  const profit = totalAmount - fees;
  // The contest's final-round script rounds p99 to 2 decimals, then the bonus to 2 decimals.
  const bonus = round2(Math.max((BONUS_P99_CEILING_MS - round2(p99Ms)) * BONUS_PER_MS, 0));
  const fine = inconsistencyCount > 0 ? INCONSISTENCY_FINE : 0;
  const lag = accepted - (defaultRequests + fallbackRequests);
  const disqualified = lag < 0;
  const final = round2(profit * (1 + bonus - fine));
  return {
    total_amount: round2(totalAmount), fees: round2(fees), profit: round2(profit),
    p99_ms: p99Ms, bonus, inconsistencies: inconsistencyCount, fine, lag, disqualified,
    final: disqualified ? 0 : final, final_if_qualified: final,
  };
}

function metricValue(data, name, stat, fallback) {
  const metric = data.metrics[name];
  if (!metric || metric.values[stat] === undefined) return fallback;
  return metric.values[stat];
}

export function handleSummary(data) {
  const get = (name, stat) => metricValue(data, name, stat, 0);
  const backendSummary = {
    ok: get('final_summary_ok', 'value') === 1,
    default: { totalRequests: get('final_default_requests', 'value'),
      totalAmount: get('final_default_cents', 'value') / 100 },
    fallback: { totalRequests: get('final_fallback_requests', 'value'),
      totalAmount: get('final_fallback_cents', 'value') / 100 },
  };
  const feeRates = {
    default: metricValue(data, 'fee_rate_default', 'value', FEE_RATE_DEFAULT.default),
    fallback: metricValue(data, 'fee_rate_fallback', 'value', FEE_RATE_DEFAULT.fallback),
  };
  const accepted = get('payments_accepted', 'count');
  const result = {
    config: {
      mode: MODE, hop_over: HOP_OVER, backend_url: BACKEND_URL, processors: PROCESSORS,
      max_requests: MAX_REQUESTS, duration_scale: DURATION_SCALE, p99_budget_ms: P99_BUDGET_MS,
      max_inconsistencies: MAX_INCONSISTENCIES, final_window_s: FINAL_WINDOW_S,
      check_every_s: CHECK_EVERY_S * DURATION_SCALE,
      check_window_ms: [-CHECK_FROM_AGO_MS, -CHECK_TO_AGO_MS], http_timeout: HTTP_TIMEOUT,
    },
    schedule: SCHEDULE.map((step) => ({ ...step, at_s: step.at_s * DURATION_SCALE })),
    test_run_duration_ms: data.state.testRunDurationMs,
    http: {
      requests: get('http_reqs', 'count'),
      p50_ms: get('http_req_duration', 'med'),
      p90_ms: get('http_req_duration', 'p(90)'),
      p95_ms: get('http_req_duration', 'p(95)'),
      p99_ms: get('http_req_duration', 'p(99)'),
      p99_expected_response_ms: get('http_req_duration{expected_response:true}', 'p(99)'),
      max_ms: get('http_req_duration', 'max'),
      failed_rate: get('http_req_failed', 'rate'),
    },
    payments: { accepted, failed: get('payments_failed', 'count') },
    consistency: {
      checks: get('consistency_checks', 'count'), errors: get('consistency_errors', 'count'),
      inconsistencies: get('inconsistencies', 'count'),
      inconsistencies_strict: get('inconsistencies_strict', 'count'),
    },
    admin_errors: get('admin_errors', 'count'),
    backend_summary: backendSummary,
    fee_rates: feeRates,
    processor_summary: {
      default: { totalRequests: metricValue(data, 'processor_default_requests', 'value', null) },
      fallback: { totalRequests: metricValue(data, 'processor_fallback_requests', 'value', null) },
    },
    score: score({
      defaultRequests: backendSummary.default.totalRequests,
      fallbackRequests: backendSummary.fallback.totalRequests,
      defaultCents: get('final_default_cents', 'value'),
      fallbackCents: get('final_fallback_cents', 'value'),
      feeRateDefault: feeRates.default, feeRateFallback: feeRates.fallback,
      p99Ms: get('http_req_duration', 'p(99)'),
      inconsistencyCount: get('inconsistencies', 'count'), accepted,
    }),
    thresholds: Object.fromEntries(Object.entries(data.metrics)
      .filter(([, metric]) => metric.thresholds)
      .map(([name, metric]) => [name, Object.fromEntries(Object.entries(metric.thresholds)
        .map(([expr, verdict]) => [expr, verdict.ok]))])),
  };
  const outputs = { stdout: textSummary(result) };
  if (SUMMARY_JSON) outputs[SUMMARY_JSON] = JSON.stringify(result, null, 2);
  return outputs;
}

function textSummary(r) {
  const s = r.score;
  const lines = [
    '',
    `${r.config.mode === 'floor' ? 'floor run (nginx answering by itself)' : 'rinha contest run'}:`
      + ` ${r.config.max_requests} VUs, duration scale ${r.config.duration_scale}`,
    `  final score      ${s.final.toFixed(2)}${s.disqualified ? '  DISQUALIFIED (negative lag)' : ''}`,
    `  profit           ${s.profit.toFixed(2)}  (amount ${s.total_amount.toFixed(2)} - fees ${s.fees.toFixed(2)})`,
    `  p99              ${s.p99_ms.toFixed(2)} ms over ${r.http.requests} requests -> bonus ${(s.bonus * 100).toFixed(0)} %`,
    `  inconsistencies  ${s.inconsistencies} in ${r.consistency.checks} checks (${r.consistency.errors} errors) -> fine ${(s.fine * 100).toFixed(0)} %`
      + `; strict ${r.consistency.inconsistencies_strict}`,
    `  lag              ${s.lag}  (accepted ${r.payments.accepted}, failed ${r.payments.failed})`,
    `  default          ${r.backend_summary.default.totalRequests} payments`,
    `  fallback         ${r.backend_summary.fallback.totalRequests} payments`,
  ];
  if (!r.backend_summary.ok) lines.push('  WARNING: the final backend summary could not be read');
  for (const [metric, verdicts] of Object.entries(r.thresholds)) {
    if (metric.includes('{')) continue;  // the submetric's always-true threshold
    for (const [expr, ok] of Object.entries(verdicts)) {
      lines.push(`  threshold ${metric} ${expr}: ${ok ? 'ok' : 'CROSSED'}`);
    }
  }
  return `${lines.join('\n')}\n`;
}
