// The web page of the heatmap service: plain JavaScript over the JSON API, no build step.
// Every call carries the API key (kept in sessionStorage, this tab only) as X-API-Key;
// there is no cookie and the key never goes into a URL.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("page-config").textContent);
  const body = document.body;
  const KEY_NAME = "heatmapApiKey";
  const JOB_ID = /^[0-9a-f]{32}$/;
  // matplotlib's "inferno" anchors, the colormap the worker draws the heat layers with.
  const INFERNO = ["#000004", "#280b54", "#65156e", "#9f2a63", "#d44842", "#f57d15", "#fac127", "#fcffa4"];

  const $ = (id) => document.getElementById(id);
  const el = (tag, props, ...children) => {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) node.append(child);
    return node;
  };
  const show = (node, text) => {
    if (text !== undefined) node.textContent = text;
    node.hidden = false;
  };
  const hide = (node) => {
    node.hidden = true;
  };
  const fmt = (value, digits = 3) => (value === null || value === undefined ? "-" : Number(value).toFixed(digits));

  // --- the key and the API -------------------------------------------------------------
  const getKey = () => sessionStorage.getItem(KEY_NAME);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function headers(extra) {
    const result = Object.assign({}, extra || {});
    const key = getKey();
    if (key) result["X-API-Key"] = key;
    return result;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    opts.credentials = "omit";
    const response = await fetch(path, opts);
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await response.json() : null;
    if (!response.ok) {
      const error = (data && data.error) || { code: "http_" + response.status, message: response.statusText };
      // A key problem (401, or 403 "forbidden"); other 403s (image_url_disabled, url_not_allowed)
      // are about the input and must not ask for the key again.
      if (response.status === 401 || (response.status === 403 && error.code === "forbidden")) askForKey(error.message);
      throw new ApiError(response.status, error.code, error.message);
    }
    return data;
  }

  function askForKey(message) {
    sessionStorage.removeItem(KEY_NAME);
    hide($("key-status"));
    show($("key-panel"));
    if (message) show($("key-error"), message);
    $("api-key").focus();
  }

  // Resolves once a key the service accepts is stored (at once in open mode).
  function ensureKey() {
    if (!config.auth_required) return Promise.resolve();
    return new Promise((resolve) => {
      let started = false;
      const done = () => {
        hide($("key-panel"));
        hide($("key-error"));
        show($("key-status"));
        if (started) location.reload(); // a key asked for again later (401/403): start over with it
        started = true;
        resolve();
      };
      $("key-form").addEventListener("submit", async (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_NAME, $("api-key").value.trim());
        $("api-key").value = "";
        try {
          await api("/api/v1/jobs?limit=1");
          done();
        } catch (error) {
          askForKey(error.code + ": " + error.message);
        }
      });
      if (getKey()) done();
      else askForKey();
    });
  }

  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    location.reload();
  });

  function pageError(error) {
    show($("page-error"), error.code ? error.code + ": " + error.message : String(error));
  }

  // Downloads need the key header, so the page fetches them and saves the bytes.
  async function download(url, name) {
    const response = await fetch(url, { headers: headers(), credentials: "omit" });
    if (!response.ok) {
      pageError(new ApiError(response.status, "http_" + response.status, "download failed"));
      return;
    }
    const blobUrl = URL.createObjectURL(await response.blob());
    const link = el("a", { href: blobUrl, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(blobUrl), 10000);
  }

  function downloadLink(url, name, label) {
    const link = el("a", { href: url, textContent: label || name });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      download(url, name);
    });
    return link;
  }

  // --- submit page ---------------------------------------------------------------------
  // Which field an error is about (the message stays in the general box too): by its code,
  // else by the first field name the message mentions.
  const ERROR_FIELDS = {
    unknown_class: "classes",
    unknown_model: "model",
    model_unavailable: "model",
    missing_image: "image",
    multiple_images: "image",
    unsupported_format: "image",
    multi_frame: "image",
    too_many_pixels: "image",
    image_too_small: "image",
    payload_too_large: "image",
    image_url_disabled: "image_url",
    url_not_allowed: "image_url",
    invalid_image_url: "image_url",
    url_unreadable: "image_url",
    invalid_callback_url: "callback_url",
  };
  let currentModel = null;

  function limitsText(field, maximum) {
    const parts = [];
    if (field.minimum !== null && maximum) parts.push(field.minimum + " to " + maximum);
    else if (field.minimum !== null) parts.push("at least " + field.minimum);
    if (field.default !== null && field.default !== undefined) parts.push("default " + field.default);
    return parts.join(", ");
  }

  function fieldInput(field) {
    if (field.choices) {
      const select = el("select", { id: field.name, name: field.name });
      if (!field.default) select.append(el("option", { value: "", textContent: "(service default)" }));
      for (const choice of field.choices) select.append(el("option", { value: choice, textContent: choice }));
      if (field.default) select.value = field.default;
      return select;
    }
    const input = el("input", { id: field.name, name: field.name, type: field.type === "integer" ? "number" : "text" });
    if (field.minimum !== null) input.min = field.minimum;
    if (field.maximum) input.max = field.maximum;
    if (field.type === "integer" && field.default !== null) input.placeholder = String(field.default);
    return input;
  }

  function fieldRow(field) {
    const row = el("div", { className: "field", id: "field-" + field.name });
    if (field.place === "tiled") row.dataset.mode = "tiled"; // shown in tiled mode only
    row.append(el("label", { htmlFor: field.name, textContent: field.name.replace("_", " ") }), fieldInput(field));
    row.append(el("small", { className: "description", textContent: field.description }));
    row.append(el("small", { id: field.name + "-limits", textContent: limitsText(field, field.maximum) }));
    row.append(el("p", { id: field.name + "-error", className: "error field-error", role: "alert", hidden: true }));
    return row;
  }

  function maskFileRow() {
    const row = el("div", { className: "field", id: "field-mask_image", hidden: true });
    row.append(
      el("label", { htmlFor: "mask_image", textContent: "mask image" }),
      el("input", { id: "mask_image", name: "mask_image", type: "file", accept: "image/*,.tif,.tiff" }),
      el("small", { textContent: "a picture of the image's extent, any size: light (grey > 127) = analyse, black = skip" }),
      el("p", { id: "mask_image-error", className: "error field-error", role: "alert", hidden: true }),
    );
    return row;
  }

  function buildOtherFields() {
    const skip = new Set(["model", "top_k", "classes"]);
    for (const field of config.fields) {
      if (skip.has(field.name)) continue;
      $(field.place === "advanced" ? "advanced-fields" : "other-fields").append(fieldRow(field));
    }
    if ($("field-mask")) {
      $("field-mask").after(maskFileRow());
      const syncMask = () => ($("field-mask_image").hidden = $("mask").value !== "image");
      $("mask").addEventListener("change", syncMask);
      syncMask();
    }
    const topK = config.fields.find((f) => f.name === "top_k");
    $("top_k").min = topK.minimum;
    $("top_k").max = topK.maximum;
    $("top_k").value = topK.default;
    $("top_k-limits").textContent = limitsText(topK, topK.maximum);
    if ($("mode")) {
      const sync = () => {
        for (const row of document.querySelectorAll("#submit-form [data-mode]")) row.hidden = row.dataset.mode !== $("mode").value;
        if (currentModel) showModel(currentModel);
      };
      $("mode").addEventListener("change", sync);
      sync();
    }
    if ($("mpp")) $("mpp").addEventListener("input", () => currentModel && showModel(currentModel));
  }

  // The model's facts for the form: stride, window (in microns when an mpp is given).
  function modelFacts(model) {
    const { width, height } = model.input_size;
    const parts = [model.num_classes + " classes", "window " + width + "x" + height + " px"];
    parts.push(model.output_stride ? "output stride " + model.output_stride + " px" : "output stride: from the network's layers (its sidecar does not state it)");
    const mpp = $("mpp") ? Number($("mpp").value) : 0;
    if (mpp > 0) parts.push("at " + mpp + " µm/px the window covers " + fmt(width * mpp, 1) + " x " + fmt(height * mpp, 1) + " µm");
    else parts.push("on a slide, the window covers window x the level's µm/px (give mpp to see it here)");
    const background = model.background_classes || [];
    if (background.length) parts.push("background (skipped by top-k and the first view): " + background.join(", "));
    return parts.join(", ") + (model.description ? ". " + model.description : "");
  }

  function topKBound(model) {
    const configured = Number(config.fields.find((f) => f.name === "top_k").maximum);
    return Math.max(1, Math.min(configured, model.num_classes - (model.background_classes || []).length));
  }

  function showModel(model) {
    currentModel = model;
    $("model-info").textContent = modelFacts(model);
    if (model.available) hide($("model-unavailable"));
    else show($("model-unavailable"), "Unavailable here: " + model.reason);
    $("submit-button").disabled = !model.available;
    const choices = $("class-choices");
    if (choices.dataset.model !== model.name) {
      choices.dataset.model = model.name;
      choices.replaceChildren();
      model.classes.forEach((name, index) => {
        const box = el("input", { type: "checkbox", name: "class", value: name });
        box.addEventListener("change", () => (document.querySelector("input[value=classes]").checked = true));
        choices.append(el("label", { className: "choice" }, box, " " + name + " (" + index + ")"));
      });
    }
    const window = Math.min(model.input_size.width, model.input_size.height);
    if ($("stride")) {
      const tiled = !$("mode") || $("mode").value === "tiled";
      const choices = model.output_stride
        ? [1, 2, 4, 8].map((f) => model.output_stride / f).filter(Number.isInteger).join(", ") +
          " (default " + model.output_stride + ")"
        : "the output stride divided by 1, 2, 4 or 8";
      $("stride").max = tiled ? window : model.output_stride || "";
      $("stride-limits").textContent = tiled
        ? "1 to " + window + " (the window), default " + Math.floor(window / 2)
        : "direct: " + choices;
    }
    const bound = topKBound(model);
    const topK = config.fields.find((f) => f.name === "top_k");
    $("top_k").max = bound;
    if (Number($("top_k").value) > bound) $("top_k").value = bound;
    $("top_k-limits").textContent =
      "1 to " + bound + ", default " + Math.min(topK.default, bound) +
      ((model.background_classes || []).length ? " (background classes are not counted)" : "");
  }

  function formData() {
    const data = new FormData();
    const file = $("image").files[0];
    if (file) data.append("image", file);
    data.append("model", $("model").value);
    if (document.querySelector("input[name=selection]:checked").value === "classes") {
      const chosen = [...document.querySelectorAll("input[name=class]:checked")].map((box) => box.value);
      data.append("classes", chosen.join(","));
    } else if ($("top_k").value) {
      data.append("top_k", $("top_k").value);
    }
    for (const field of config.fields) {
      const input = $(field.name);
      if (["model", "top_k", "classes"].includes(field.name) || !input || input.closest("[hidden]")) continue;
      if (input.value !== "") data.append(field.name, input.value);
    }
    const mask = $("mask_image");
    if (mask && !mask.closest("[hidden]") && mask.files[0]) data.append("mask_image", mask.files[0]);
    return data;
  }

  function errorField(error) {
    if (ERROR_FIELDS[error.code]) return ERROR_FIELDS[error.code];
    const names = config.fields.map((f) => f.name).sort((a, b) => b.length - a.length);
    return names.find((name) => new RegExp("\\b" + name + "\\b").test(error.message || "")) || null;
  }

  function showSubmitError(error) {
    for (const node of document.querySelectorAll(".field-error")) hide(node);
    const text = error.code + ": " + error.message;
    show($("submit-error"), text);
    const name = errorField(error);
    const box = name && $(name + "-error");
    if (!box) return;
    if (box.closest("#advanced")) $("advanced").open = true;
    show(box, text);
  }

  async function submitPage() {
    $("max-upload").textContent = config.max_upload_mb;
    const catalogue = await api("/api/v1/models");
    const models = catalogue.models;
    for (const model of models) {
      const label = model.available ? model.name : model.name + " (unavailable)";
      $("model").append(el("option", { value: model.name, textContent: label, title: model.reason || "" }));
    }
    if (models.some((m) => m.name === config.default_model)) $("model").value = config.default_model;
    const current = () => models.find((m) => m.name === $("model").value);
    buildOtherFields();
    $("model").addEventListener("change", () => showModel(current()));
    showModel(current());
    show($("submit-form"));
    $("submit-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      hide($("submit-error"));
      $("submit-button").disabled = true;
      try {
        const job = await api("/api/v1/jobs", { method: "POST", body: formData() });
        location.assign("/jobs/" + job.id);
      } catch (error) {
        showSubmitError(error);
        $("submit-button").disabled = false;
      }
    });
  }

  // --- jobs page -----------------------------------------------------------------------
  async function jobsPage() {
    for (const status of config.statuses) $("status-filter").append(el("option", { value: status, textContent: status }));
    let cursors = [null]; // cursor of each page seen, for "Newest"
    let next = null;
    const load = async (cursor) => {
      const query = new URLSearchParams({ limit: $("page-size").value });
      if ($("status-filter").value) query.set("status", $("status-filter").value);
      if (cursor) query.set("cursor", cursor);
      const page = await api("/api/v1/jobs?" + query);
      const rows = page.jobs.map((job) => {
        const percent = Math.round(job.progress * 100);
        return el(
          "tr",
          { className: "status-" + job.status },
          el("td", { textContent: (job.created_at || "").replace("T", " ").slice(0, 19) }),
          el("td", {}, el("a", { href: "/jobs/" + job.id, textContent: job.id.slice(0, 12) })),
          el("td", { textContent: job.model }),
          el("td", { textContent: job.mode }),
          el("td", { textContent: job.image.width + "x" + job.image.height }),
          el("td", { className: "status", textContent: job.status }),
          el("td", {}, el("progress", { max: 100, value: percent }), " " + percent + " %"),
        );
      });
      document.querySelector("#jobs-table tbody").replaceChildren(...rows);
      $("jobs-empty").hidden = rows.length > 0 || cursor !== null;
      next = page.next_cursor;
      $("next-page").disabled = !next;
      $("first-page").disabled = cursor === null;
    };
    let current = null;
    const reload = () => load(current).catch(pageError);
    $("status-filter").addEventListener("change", () => ((current = null), (cursors = [null]), reload()));
    $("page-size").addEventListener("change", () => ((current = null), (cursors = [null]), reload()));
    $("refresh").addEventListener("click", reload);
    $("next-page").addEventListener("click", () => (cursors.push(next), (current = next), reload()));
    $("first-page").addEventListener("click", () => ((current = null), (cursors = [null]), reload()));
    await load(null);
    setInterval(() => {
      if (document.querySelector("#jobs-table tr.status-queued, #jobs-table tr.status-running")) reload();
    }, 2000);
  }

  // --- job page ------------------------------------------------------------------------
  async function jobPage() {
    const jobId = body.dataset.jobId;
    $("job-id").textContent = jobId;
    if (!JOB_ID.test(jobId)) throw new ApiError(404, "not_found", "no such job");
    let viewerShown = false;
    for (;;) {
      const job = await api("/api/v1/jobs/" + jobId);
      showStatus(job);
      if (job.status === config.status_succeeded && !viewerShown) {
        viewerShown = true;
        await showResult(job);
      }
      if (!config.active_statuses.includes(job.status)) return;
      await new Promise((resolve) => setTimeout(resolve, 700));
    }
  }

  function showStatus(job) {
    show($("job-status-panel"));
    const percent = Math.round(job.progress * 100);
    $("job-status").textContent = job.status;
    $("job-status").className = "status-" + job.status;
    $("job-progress").value = percent;
    $("job-progress-text").textContent = percent + " %";
    const active = config.active_statuses.includes(job.status);
    $("job-phase").textContent = active ? job.phase : ""; // reading, inference, writing, storing
    $("cancel-job").hidden = !active;
    $("delete-job").hidden = active;
    $("retry-job").hidden = !config.retryable_statuses.includes(job.status);
    $("job-meta").textContent =
      "model " + job.model + ", mode " + job.mode + ", image " + job.image.width + "x" + job.image.height +
      ", created " + job.created_at + (job.attempts ? ", attempts " + job.attempts : "") +
      (job.worker ? ", worker " + job.worker : "");
    if (job.error) {
      // A canceled job is something the user did, not a fault: shown as a neutral notice.
      $("job-error").className = job.status === config.status_canceled ? "notice" : "error";
      show($("job-error"), job.error.code + ": " + job.error.message);
    }
  }

  // How much of the slide one model window covers, from summary.json (level-0 pixels and,
  // where the source states it, microns): on a slide at level 0 a 64-px window is ~16 µm.
  function showScale(summary) {
    const window = summary.grid.window;
    const source = summary.source || {};
    const level = source.analysis ? source.analysis.level : 0;
    let text = "each model window covers " + window.width + "x" + window.height + " level-0 px (analysed at level " + level + ")";
    if (source.mpp) {
      text += " = " + fmt(window.width * source.mpp.x, 1) + " x " + fmt(window.height * source.mpp.y, 1) + " µm";
      text += " (source " + fmt(source.mpp.x, 3) + " µm/px); a coarser level or mpp covers more tissue per window";
    } else {
      text += "; the source states no microns per pixel";
    }
    show($("job-scale"), text);
  }

  function jobButtons(jobId) {
    $("retry-job").addEventListener("click", async () => {
      try {
        const retry = await api("/api/v1/jobs/" + jobId + "/retry", { method: "POST" });
        location.assign("/jobs/" + retry.id);
      } catch (error) {
        pageError(error);
      }
    });
    $("cancel-job").addEventListener("click", () => api("/api/v1/jobs/" + jobId, { method: "DELETE" }).catch(pageError));
    $("delete-job").addEventListener("click", async () => {
      if (!confirm("Delete this job and its files?")) return;
      try {
        await api("/api/v1/jobs/" + jobId, { method: "DELETE" });
        location.assign("/jobs");
      } catch (error) {
        pageError(error);
      }
    });
  }

  function tileSource(jobId, layer) {
    // The Deep Zoom layer without a descriptor request; levels exist from min_level (the
    // first that fits one tile) up, so OpenSeadragon never asks for smaller. The image
    // layer's tiles are read from the job's input by the API; the heat layers' are files.
    return new OpenSeadragon.DziTileSource({
      width: layer.width,
      height: layer.height,
      tileSize: layer.tile_size,
      tileOverlap: layer.overlap,
      tilesUrl: "/api/v1/jobs/" + jobId + "/dzi/" + layer.name + "_files/",
      fileFormat: layer.format,
      minLevel: layer.min_level,
      maxLevel: layer.max_level,
    });
  }

  // Nearest window centre along one axis: the cell whose window covers the point best.
  function nearestCell(origins, span, position) {
    let best = 0;
    let distance = Infinity;
    for (let i = 0; i < origins.length; i++) {
      const d = Math.abs(origins[i] + span / 2 - position);
      if (d < distance) {
        distance = d;
        best = i;
      }
    }
    return best;
  }

  function scoreAt(grid, channel, x, y) {
    const i = nearestCell(grid.rows, grid.span.height, y);
    const j = nearestCell(grid.cols, grid.span.width, x);
    return grid.scores[channel][i][j];
  }

  // The first class shown: the strongest that is not a background class of the model.
  async function firstChannel(job, manifest) {
    let background = [];
    try {
      const model = (await api("/api/v1/models")).models.find((m) => m.name === job.model);
      background = (model && model.background_classes) || [];
    } catch (error) {
      background = []; // the model list is a hint here; the viewer works without it
    }
    let best = 0;
    let bestScore = -Infinity;
    manifest.classes.forEach((cls, channel) => {
      const score = background.includes(cls.name) ? -Infinity : Number(cls.max);
      if (score > bestScore) {
        best = channel;
        bestScore = score;
      }
    });
    return best;
  }

  async function showResult(job) {
    const manifest = await api("/api/v1/jobs/" + job.id + "/viewer");
    api(job.result.summary_url).then(showScale).catch(() => hide($("job-scale")));
    const first = await firstChannel(job, manifest);
    show($("result"));
    const viewer = OpenSeadragon({
      element: $("viewer"),
      prefixUrl: body.dataset.static + "vendor/openseadragon/images/",
      tileSources: tileSource(job.id, manifest.image),
      loadTilesWithAjax: true,
      ajaxHeaders: headers(),
      drawer: "canvas",
      showNavigator: true,
      maxZoomPixelRatio: 4,
      crossOriginPolicy: false,
    });
    const state = { viewer, manifest, layers: [], channel: first, markers: [] };
    window.heatmapViewer = state; // for the browser tests and the console
    viewer.addOnceHandler("open", () => addHeatLayers(state, job));
    buildClassTable(job, manifest);
    buildDownloads(job, manifest);
  }

  function addHeatLayers(state, job) {
    const { viewer, manifest } = state;
    manifest.classes.forEach((cls, channel) => {
      viewer.addTiledImage({
        tileSource: tileSource(job.id, cls.layer),
        x: 0,
        y: 0,
        width: 1, // the image's width in viewport coordinates: the heat is stretched over it
        opacity: 0,
        preload: true, // hidden layers load too: switching classes is instant
        success: (event) => {
          state.layers[channel] = event.item;
          if (channel === state.channel) selectClass(state, channel);
          if (state.layers.filter(Boolean).length === manifest.classes.length) state.ready = true;
        },
      });
    });
    const select = $("class-select");
    manifest.classes.forEach((cls, channel) => select.append(el("option", { value: channel, textContent: cls.name })));
    select.addEventListener("change", () => selectClass(state, Number(select.value)));
    $("opacity").addEventListener("input", () => selectClass(state, state.channel));
    $("colourbar").style.background = "linear-gradient(to right, " + INFERNO.join(", ") + ")";
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: (event) => showCursorScore(state, event.position),
    });
  }

  function selectClass(state, channel) {
    state.channel = channel;
    const cls = state.manifest.classes[channel];
    const opacity = Number($("opacity").value) / 100;
    state.layers.forEach((layer, k) => layer && layer.setOpacity(k === channel ? opacity : 0));
    $("class-select").value = String(channel);
    if (cls.near_chance) {
      show(
        $("chance-note"),
        cls.name + " is near chance: its scores vary by less than a tenth of the score scale (" + fmt(cls.low) +
          " to " + fmt(cls.max) + "), so the map is drawn dim. An untrained or unsure model looks like this.",
      );
    } else hide($("chance-note"));
    $("bar-low").textContent = fmt(cls.low);
    $("bar-high").textContent = fmt(cls.high);
    $("colourbar").title =
      "colours span " + cls.name + "'s " + state.manifest.weighting + "-blended scores, " + fmt(cls.low) + " to " +
      fmt(cls.high) + "; its best window scores " + fmt(cls.max);
    for (const marker of state.markers) state.viewer.removeOverlay(marker);
    const image = state.viewer.world.getItemAt(0);
    const marker = el("div", { className: "peak-marker", title: "peak of " + cls.name + ": " + fmt(cls.high) });
    state.viewer.addOverlay({
      element: marker,
      location: image.imageToViewportCoordinates(cls.peak.x, cls.peak.y),
      placement: OpenSeadragon.Placement.CENTER,
      checkResize: false,
    });
    state.markers = [marker];
    if (state.cursor) showCursorScore(state, state.cursor);
  }

  function showCursorScore(state, position) {
    state.cursor = position;
    const image = state.viewer.world.getItemAt(0);
    if (!image) return;
    const point = image.viewerElementToImageCoordinates(position);
    const { width, height } = state.manifest.image;
    const x = Math.floor(point.x);
    const y = Math.floor(point.y);
    if (x < 0 || y < 0 || x >= width || y >= height) {
      $("cursor-score").textContent = "outside the image";
      return;
    }
    const cls = state.manifest.classes[state.channel];
    const score = scoreAt(state.manifest.grid, state.channel, x, y);
    $("cursor-score").textContent = "x " + x + ", y " + y + ": " + cls.name + " " + fmt(score, 4);
  }

  function buildClassTable(job, manifest) {
    const rows = job.result.classes.map((cls) =>
      el(
        "tr",
        {},
        el("td", { textContent: cls.name }),
        el("td", { textContent: fmt(cls.max, 4) }),
        el("td", { textContent: fmt(cls.mean, 4) }),
        el("td", { textContent: cls.peak.x + ", " + cls.peak.y }),
        el("td", {}, downloadLink(cls.overlay_url, "overlay_" + cls.index + ".png", "PNG")),
      ),
    );
    document.querySelector("#classes-table tbody").replaceChildren(...rows);
  }

  function buildDownloads(job, manifest) {
    const base = "/api/v1/jobs/" + job.id;
    const maps = [
      ["raster_url", "heatmap.tif", "heatmap.tif (pyramidal (Geo)TIFF of the scores: QuPath, QGIS)"],
      ["regions_url", "regions.geojson", "regions.geojson (regions above the threshold: QuPath)"],
      ["regions_map_url", "regions_map.geojson", "regions_map.geojson (the regions in map coordinates: QGIS)"],
    ].filter(([key]) => job.result[key]);
    const items = [
      ...maps.map(([key, name, label]) => downloadLink(job.result[key], name, label)),
      downloadLink(job.result.heatmap_url, "heatmap.npz", "heatmap.npz (score grid)"),
      downloadLink(job.result.summary_url, "summary.json", "summary.json"),
      downloadLink(base + "/viewer", "viewer.json", "viewer.json (viewer manifest and grid)"),
      downloadLink(base + "/dzi/image.dzi", "image.dzi", "image.dzi (Deep Zoom descriptor)"),
      ...job.result.classes.map((cls) =>
        downloadLink(cls.overlay_url, "overlay_" + cls.index + ".png", "overlay of " + cls.name + " (PNG)"),
      ),
      ...manifest.classes.map((cls) =>
        downloadLink(base + "/dzi/" + cls.layer.name + ".dzi", cls.layer.name + ".dzi", "heat of " + cls.name + " (Deep Zoom)"),
      ),
    ];
    $("downloads").replaceChildren(...items.map((item) => el("li", {}, item)));
  }

  // --- start ---------------------------------------------------------------------------
  const pages = { submit: submitPage, jobs: jobsPage, job: jobPage };
  ensureKey()
    .then(() => {
      if (body.dataset.page === "job") jobButtons(body.dataset.jobId);
      return pages[body.dataset.page]();
    })
    .catch(pageError);
})();
