// Drives the dashboard in Debian's Chromium (playwright-core, no downloaded browser).
// Run by tests/hub/browser.rs, which starts the hub and its devices:
//
//   node tests/browser/dashboard.mjs <base-url> <api-key> [screenshot.png]
//
// Silences the label filter's devices and one device from its card, and checks their
// badges. Talks to its driver over stdio: prints READY when the fleet is checked, waits for
// the driver to silence `pump-live` (it says SILENCED), checks that the card turns red
// without a reload, prints PASS. Any failure prints FAIL <why> and exits 1.
import { chromium } from "playwright-core";
import readline from "node:readline";

const [base, key, screenshot] = process.argv.slice(2);
const COLOURS = {
  online: "rgb(34, 197, 94)",
  offline: "rgb(239, 68, 68)",
  error: "rgb(245, 158, 11)",
  provisioning: "rgb(156, 163, 175)",
};
const input = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

function check(condition, why) {
  if (!condition) throw new Error(why);
}

async function ledColour(page, id) {
  return page.$eval(`.card[data-device-id="${id}"] .led`, (el) => getComputedStyle(el).backgroundColor);
}

async function waitForColour(page, id, colour, timeout) {
  await page.waitForFunction(
    ([id, colour]) => {
      const led = document.querySelector(`.card[data-device-id="${id}"] .led`);
      return led && getComputedStyle(led).backgroundColor === colour;
    },
    [id, colour],
    { timeout },
  );
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
  page.on("pageerror", (e) => console.log(`FAIL page error: ${e.message}`));
  await page.goto(base);

  // The API needs a key: the page asks for one and keeps it.
  await page.waitForSelector("#key-dialog[open]", { timeout: 10000 });
  await page.fill("#key-input", key);
  await page.press("#key-input", "Enter");

  // Every status has its colour.
  const expected = { "pump-online": "online", "pump-live": "online", "pump-error": "error",
                     "pump-offline": "offline", "pump-spare": "provisioning" };
  for (const [id, status] of Object.entries(expected)) {
    await waitForColour(page, id, COLOURS[status], 15000);
    check(await ledColour(page, id) === COLOURS[status], `${id} should be ${status}`);
  }
  await page.waitForFunction(() => document.querySelector("#n-total").textContent !== "–");
  const counts = await page.$eval("#counts", (el) => el.textContent);
  check(/offline\s*1\b/.test(counts) && /provisioning\s*1\b/.test(counts), `counts: ${counts}`);
  check((await page.textContent('.card[data-device-id="pump-online"] .seen')).includes("last seen"),
        "cards say when the device was last seen");

  // The Notifications panel: the sink, its kind, what it delivered.
  await page.waitForSelector('#sinks:not([hidden]) tr[data-sink="ops"]', { timeout: 15000 });
  const sinkRow = await page.$eval('tr[data-sink="ops"]', (tr) => [...tr.cells].map((td) => td.textContent));
  check(sinkRow[1] === "webhook" && sinkRow[2] === "on" && Number(sinkRow[5]) >= 2,
        `notifications panel: ${sinkRow}`);

  // A click shows the reported fields.
  await page.click('.card[data-device-id="pump-error"]');
  await page.waitForSelector("#details.open");
  const details = await page.textContent("#d-fields");
  check(details.includes("simulated fault") && details.includes("1.4.2"), `details: ${details}`);
  await page.click("#close-details");

  // Search by id prefix.
  await page.fill("#search", "pump-o");
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 2);
  await page.fill("#search", "");
  await page.waitForFunction(() => document.querySelectorAll(".card").length > 2);

  // Filter by label: the two devices at site north, their label on the card.
  await page.fill("#label", "site:north");
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 2);
  const labelled = await page.$$eval(".card", (cards) => cards.map((c) => c.dataset.deviceId).sort());
  check(labelled.join() === "pump-error,pump-online", `label filter: ${labelled}`);
  check((await page.textContent('.card[data-device-id="pump-online"] .info')).includes("site:north"),
        "cards show their labels");

  // Silence the site for 4 hours: the filter's label becomes the silence's, and both
  // cards say until when.
  await page.click("#silence-these");
  await page.waitForSelector("#silence-dialog[open]");
  check((await page.textContent("#silence-target")).includes("site:north"), "the dialog names the filter");
  await page.selectOption("#silence-duration", "4h");
  await page.fill("#silence-comment", "pump swap");
  await page.click("#silence-submit");
  for (const id of ["pump-online", "pump-error"]) {
    await page.waitForSelector(`.card[data-device-id="${id}"] .quiet:not([hidden])`, { timeout: 10000 });
    check((await page.textContent(`.card[data-device-id="${id}"] .quiet`)).startsWith("silenced until "),
          `${id} is marked silenced`);
  }
  const silences = await (await fetch(`${base}/api/v1/silences`, { headers: { Authorization: `Bearer ${key}` } })).json();
  check(silences.silences.length === 1 && silences.silences[0].labels.site === "north" &&
        silences.silences[0].comment === "pump swap" &&
        Date.parse(silences.silences[0].ends_at) - Date.parse(silences.silences[0].starts_at) === 4 * 3600 * 1000,
        `the silence posted: ${JSON.stringify(silences)}`);
  await page.fill("#label", "");
  await page.waitForFunction(() => document.querySelectorAll(".card").length > 2);
  await waitForColour(page, "pump-live", COLOURS.online, 10000);
  check(await page.$eval('.card[data-device-id="pump-live"] .quiet', (el) => el.hidden), "pump-live is not silenced");

  // One device, from its card's button (which does not open the details).
  await page.click('.card[data-device-id="pump-spare"] .silence-one');
  await page.waitForSelector("#silence-dialog[open]");
  check(!(await page.$eval("#details", (el) => el.classList.contains("open"))), "the button opens no details");
  check((await page.textContent("#silence-target")) === "pump-spare", "the dialog names the device");
  await page.click("#silence-submit");
  await page.waitForSelector('.card[data-device-id="pump-spare"] .quiet:not([hidden])', { timeout: 10000 });

  // Live: the driver silences pump-live; its card turns red with no reload.
  await page.evaluate(() => { window.__sameDocument = true; });
  console.log("READY");
  const { value: line } = await input.next();
  check(line === "SILENCED", `unexpected driver line ${line}`);
  await waitForColour(page, "pump-live", COLOURS.offline, 20000);
  check(await page.evaluate(() => window.__sameDocument === true), "the page was reloaded");
  check((await page.$eval("#n-offline", (el) => el.textContent)) === "2", "offline count follows");

  if (screenshot) await page.screenshot({ path: screenshot });

  // A grouped notification's link opens the dashboard filtered to its group.
  await page.goto(`${base}/?label=site:north&status=error`);
  if (await page.$("#key-dialog[open]")) {
    await page.fill("#key-input", key);
    await page.press("#key-input", "Enter");
  }
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 1, null, { timeout: 10000 });
  const linked = await page.$$eval(".card", (cards) => cards.map((c) => c.dataset.deviceId));
  check(linked.join() === "pump-error", `the link's filters: ${linked}`);
  check((await page.inputValue("#label")) === "site:north", "the label box shows the link's filter");
  check((await page.$eval('.count[data-filter="error"]', (el) => el.getAttribute("aria-pressed"))) === "true",
        "the link's status is pressed");
  console.log("PASS");
} catch (e) {
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
