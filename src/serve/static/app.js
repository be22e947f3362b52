'use strict';
// The page of `mcld serve`: builds the form, submits a job, follows its events (SSE).

const $ = (id) => document.getElementById(id);
let selectedPose = null;
let events = null;
let jobId = null;
let sourceUrl = null;
let untrained = false;

async function getJSON(url) {
  const r = await fetch(url);
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}

function showError(msg) {
  $('error').textContent = msg;
  $('error').hidden = false;
}

function hideError() {
  $('error').hidden = true;
}

async function refreshStatus() {
  let s;
  try {
    s = await getJSON('/api/status');
  } catch (e) {
    $('model').textContent = 'server unreachable';
    setTimeout(refreshStatus, 3000);
    return;
  }
  const m = s.model;
  if (m.state === 'loading') {
    $('model').textContent = 'loading the networks…';
    setTimeout(refreshStatus, 1000);
    return s;
  } else if (m.state === 'failed') {
    $('model').textContent = 'the networks failed to load';
    showError('The networks failed to load: ' + m.message);
  } else {
    $('model').textContent = `ready on ${s.device} (${s.dtype}); networks loaded in ${m.load_seconds.toFixed(1)} s`;
    untrained = m.untrained;
    $('untrained').hidden = !m.untrained;
    if (!$('steps').value) $('steps').value = m.default_steps;
    if (!$('guidance').value) $('guidance').value = m.default_guidance;
  }
  if (!$('garments').tBodies[0].rows.length) buildGarments(s.regions);
  if (s.gallery === null) {
    $('gallery-note').textContent = 'No pose gallery (start the server with --poses DIR): upload a pose instead.';
    document.querySelector('input[name=pose-kind][value=iuv]').checked = true;
    showPoseBox();
  }
  return s;
}

function buildGarments(regions) {
  const body = $('garments').tBodies[0];
  for (const r of regions) {
    const tr = body.insertRow();
    tr.insertCell().textContent = r;
    for (const [prefix, accept] of [['garment_', 'image/png,image/jpeg'], ['garment_texture_', 'image/png']]) {
      const input = document.createElement('input');
      input.type = 'file';
      input.accept = accept;
      input.id = prefix + r;
      input.dataset.field = prefix + r;
      tr.insertCell().appendChild(input);
    }
  }
}

async function loadGallery() {
  const q = encodeURIComponent($('pose-filter').value.trim());
  let g;
  try {
    g = await getJSON(`/api/poses?q=${q}&limit=120`);
  } catch (e) {
    return;
  }
  const box = $('gallery');
  box.replaceChildren();
  for (const name of g.names) {
    const fig = document.createElement('figure');
    fig.dataset.name = name;
    if (name === selectedPose) fig.classList.add('selected');
    const img = document.createElement('img');
    img.loading = 'lazy';
    img.alt = name;
    img.src = '/api/poses/' + encodeURIComponent(name);
    const cap = document.createElement('figcaption');
    cap.textContent = name;
    fig.append(img, cap);
    fig.addEventListener('click', () => {
      selectedPose = name;
      for (const f of box.children) f.classList.toggle('selected', f === fig);
    });
    box.appendChild(fig);
  }
  $('gallery-note').textContent = g.total > g.names.length
    ? `${g.names.length} of ${g.total} poses shown; filter by name to find others.`
    : `${g.total} poses.`;
}

function poseKind() {
  return document.querySelector('input[name=pose-kind]:checked').value;
}

function showPoseBox() {
  const k = poseKind();
  $('pose-gallery-box').hidden = k !== 'gallery';
  $('pose-iuv-box').hidden = k !== 'iuv';
  $('pose-photo-box').hidden = k !== 'photo';
}

function setSource(file) {
  if (sourceUrl) URL.revokeObjectURL(sourceUrl);
  sourceUrl = file ? URL.createObjectURL(file) : null;
  $('source-preview').hidden = !file;
  if (file) $('source-preview').src = sourceUrl;
  $('drop-text').textContent = file ? 'Drop another photo to replace it' : 'Drop a photo here, or click to pick one';
}

function fmt(s) {
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function busy(on) {
  $('generate').disabled = on;
  $('cancel').disabled = !on;
}

function onEvent(ev) {
  const bar = $('bar');
  const text = $('progress-text');
  switch (ev.state) {
    case 'queued':
      bar.removeAttribute('value');
      text.textContent = `Waiting in the queue: position ${ev.position}.`;
      break;
    case 'running':
      if (ev.step) {
        bar.max = ev.steps;
        bar.value = ev.step;
        const eta = ev.eta !== undefined ? ` · about ${fmt(ev.eta)} left` : '';
        text.textContent = `Step ${ev.step} of ${ev.steps} · ${fmt(ev.elapsed)} elapsed${eta}`;
      } else {
        text.textContent = `${ev.phase[0].toUpperCase()}${ev.phase.slice(1)}… (${fmt(ev.elapsed)} elapsed)`;
      }
      break;
    case 'done':
      bar.max = 1;
      bar.value = 1;
      text.textContent = `Done in ${fmt(ev.seconds)}.`;
      showResult(ev);
      break;
    case 'failed':
      text.textContent = 'Failed.';
      showError(ev.message);
      break;
    case 'cancelled':
      text.textContent = 'Cancelled.';
      break;
  }
  if (ev.state === 'done' || ev.state === 'failed' || ev.state === 'cancelled') {
    if (events) events.close();
    events = null;
    jobId = null;
    busy(false);
  }
}

function showResult(ev) {
  $('res-source').src = sourceUrl;
  $('res-pose').src = ev.pose;
  $('result').src = ev.result;
  $('result-caption').textContent = ev.untrained ? 'result (untrained demo weights: noise)' : 'result';
  $('download').href = ev.result;
  $('download-iuv').href = ev.pose_iuv;
  $('command').textContent = ev.command;
  $('command').hidden = !ev.command;
  $('command-note').textContent = ev.command_note || '';
  $('command-note').hidden = !ev.command_note;
  $('result-card').hidden = false;
}

async function submit(e) {
  e.preventDefault();
  hideError();
  const fd = new FormData();
  const src = $('source').files[0];
  if (!src) return showError('Pick a photo of the person first.');
  fd.append('source', src);
  const kind = poseKind();
  if (kind === 'gallery') {
    if (!selectedPose) return showError('Pick a target pose from the gallery.');
    fd.append('pose', selectedPose);
  } else {
    const f = $(kind === 'iuv' ? 'pose_iuv' : 'pose_photo').files[0];
    if (!f) return showError('Pick the file of the target pose.');
    fd.append(kind === 'iuv' ? 'pose_iuv' : 'pose_photo', f);
  }
  for (const input of document.querySelectorAll('#texture, #face, #face_from, #face_emb, #garments input')) {
    if (input.files[0]) fd.append(input.dataset.field || input.id, input.files[0]);
  }
  for (const id of ['seed', 'steps', 'guidance']) {
    if ($(id).value !== '') fd.append(id, $(id).value);
  }
  busy(true);
  $('result-card').hidden = true;
  let r;
  let j;
  try {
    r = await fetch('/api/jobs', { method: 'POST', body: fd });
    j = await r.json();
  } catch (err) {
    busy(false);
    return showError('The server did not answer: ' + err.message);
  }
  if (!r.ok) {
    busy(false);
    return showError(j.error || r.statusText);
  }
  jobId = j.id;
  $('progress-card').hidden = false;
  events = new EventSource(j.events);
  events.onmessage = (m) => onEvent(JSON.parse(m.data));
  events.onerror = () => {
    if (events && events.readyState === EventSource.CLOSED) {
      showError('Lost the connection to the server.');
      busy(false);
    }
  };
}

async function cancel() {
  if (!jobId) return;
  const r = await fetch(`/api/jobs/${jobId}/cancel`, { method: 'POST' });
  if (!r.ok) {
    const j = await r.json();
    showError(j.error || r.statusText);
  } else {
    $('progress-text').textContent = 'Cancelling…';
  }
}

function init() {
  $('form').addEventListener('submit', submit);
  $('cancel').addEventListener('click', cancel);
  $('source').addEventListener('change', () => setSource($('source').files[0]));
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files.length) {
      $('source').files = e.dataTransfer.files;
      setSource($('source').files[0]);
    }
  });
  for (const r of document.querySelectorAll('input[name=pose-kind]')) r.addEventListener('change', showPoseBox);
  let timer = null;
  $('pose-filter').addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(loadGallery, 250);
  });
  refreshStatus().then((s) => {
    if (s && s.gallery !== null) loadGallery();
  });
}

init();
