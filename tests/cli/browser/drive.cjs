// Drives headless Chromium through the page of `mcld serve` like a person would: picks the
// demo photo (and its texture map: the demo weights come without DensePose), a gallery pose,
// clicks Generate, waits for the result and saves a screenshot. Prints one JSON line with what
// it saw; exits non-zero on any failure or console error.
//
// node drive.cjs URL SOURCE TEXTURE SCREENSHOT   (PLAYWRIGHT_DIR: where playwright-core is,
// CHROMIUM: the browser, USER_DATA_DIR: a fresh profile folder)
'use strict';
const path = require('path');
const { chromium } = require(path.join(process.env.PLAYWRIGHT_DIR, 'node_modules', 'playwright-core'));

async function main() {
  const [url, source, texture, shot] = process.argv.slice(2);
  const errors = [];
  const context = await chromium.launchPersistentContext(process.env.USER_DATA_DIR, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1200, height: 1050 },
  });
  const t0 = Date.now();
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
    page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
    // The page closes the event stream itself once the job is over (net::ERR_ABORTED).
    page.on('requestfailed', (r) => {
      const why = r.failure() && r.failure().errorText;
      if (!(r.url().endsWith('/events') && why === 'net::ERR_ABORTED')) errors.push(`request failed: ${r.url()} ${why}`);
    });
    await page.goto(url, { waitUntil: 'load' });
    const firstPageMs = Date.now() - t0;
    await page.waitForFunction(() => document.getElementById('model').textContent.startsWith('ready'), null, { timeout: 120000 });
    await page.setInputFiles('#source', source);
    await page.click('text=Precomputed inputs');
    await page.setInputFiles('#texture', texture);
    await page.click('#gallery figure[data-name="demo_target.png"]');
    await page.fill('#steps', '3');
    const tGen = Date.now();
    await page.click('#generate');
    await page.waitForFunction(() => {
      const img = document.getElementById('result');
      return !document.getElementById('result-card').hidden && img.complete && img.naturalWidth > 0;
    }, null, { timeout: 300000 });
    const generateMs = Date.now() - tGen;
    const seen = await page.evaluate(() => ({
      result: [document.getElementById('result').naturalWidth, document.getElementById('result').naturalHeight],
      pose: document.getElementById('res-pose').naturalWidth,
      source: document.getElementById('res-source').naturalWidth,
      progress: document.getElementById('progress-text').textContent,
      command: document.getElementById('command').textContent,
      badge: !document.getElementById('untrained').hidden,
      error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    }));
    await page.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify({ firstPageMs, generateMs, seen, errors }));
    if (errors.length || seen.error) process.exitCode = 1;
  } finally {
    await context.close();
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(2);
});
