// wsi-pipeline viewer: slide list, OpenSeadragon Deep Zoom slide, heatmap image layer, and a canvas
// for the vector layers (tissue outline, lesion mask, detections), redrawn on every viewport change.
// URL hash: #slide=ID&zoom=Z&cx=X&cy=Y (level-0 px centre) selects a slide and a view (the report's
// links use #slide=ID).
(function () {
  'use strict';
  var $ = function (id) { return document.getElementById(id); };
  var state = {slides: [], current: null, layers: {}, heatmapItem: null, ready: false};
  window.wsiViewer = state;
  var viewer = OpenSeadragon({
    id: 'viewer', prefixUrl: '', showNavigationControl: false, drawer: 'canvas',
    crossOriginPolicy: false, animationTime: 0.4, maxZoomPixelRatio: 4, imageSmoothingEnabled: false
  });
  var canvas = $('vector'), ctx = canvas.getContext('2d');

  function hashParams() {
    var out = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      if (i > 0) out[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
    });
    return out;
  }
  function getJSON(url) {
    return fetch(url).then(function (r) { if (!r.ok) throw new Error(url + ': ' + r.status); return r.json(); });
  }
  function status(text) { $('status').textContent = text; }
  function opacity(name) { return $('on-' + name).checked ? $('op-' + name).value / 100 : 0; }
  function positive(slide) {
    var models = Object.keys(slide.predictions);
    if (!models.length) return '';
    var probs = slide.predictions[models[0]].probs, names = Object.keys(probs);
    return probs[names[names.length - 1]].toFixed(3);
  }

  function fillTable() {
    var body = $('slides').tBodies[0];
    body.innerHTML = '';
    state.slides.forEach(function (s) {
      var tr = document.createElement('tr');
      tr.dataset.slide = s.slide_id;
      [s.slide_id, s.label || '', positive(s)].forEach(function (v) {
        var td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
      });
      tr.addEventListener('click', function () { location.hash = 'slide=' + encodeURIComponent(s.slide_id); });
      body.appendChild(tr);
    });
  }
  $('filter').addEventListener('input', function () {
    var q = this.value.toLowerCase();
    Array.prototype.forEach.call($('slides').tBodies[0].rows, function (tr) {
      tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });

  function options(select, values) {
    select.innerHTML = '';
    values.forEach(function (v) { var o = document.createElement('option'); o.textContent = v; select.appendChild(o); });
  }

  function openSlide(id) {
    var slide = state.slides.filter(function (s) { return s.slide_id === id; })[0];
    if (!slide) { status('no slide ' + id); return; }
    state.current = slide; state.layers = {}; state.heatmapItem = null; state.ready = false;
    document.body.dataset.ready = '0';
    Array.prototype.forEach.call($('slides').tBodies[0].rows, function (tr) {
      tr.classList.toggle('sel', tr.dataset.slide === id);
    });
    options($('heatmap-model'), slide.heatmaps);
    options($('detection-model'), slide.detections);
    status('opening ' + id);
    viewer.open('/slides/' + encodeURIComponent(id) + '.dzi');
  }

  function loadLayers(slide) {
    var base = '/overlay/' + encodeURIComponent(slide.slide_id) + '/';
    var jobs = [];
    if (slide.tissue) jobs.push(getJSON(base + 'tissue.json').then(function (d) { state.layers.tissue = d.rings; }));
    if (slide.lesion) jobs.push(getJSON(base + 'lesion.json').then(function (d) { state.layers.lesion = d.rings; }));
    var det = $('detection-model').value;
    if (det) jobs.push(getJSON(base + 'detections/' + encodeURIComponent(det) + '.json')
      .then(function (d) { state.layers.detections = d; legend(d); }));
    var model = $('heatmap-model').value;
    if (model) jobs.push(getJSON(base + 'heatmap-info/' + encodeURIComponent(model) + '.json').then(function (info) {
      var item0 = viewer.world.getItemAt(0), size = item0.getContentSize();
      return new Promise(function (resolve) {
        viewer.addTiledImage({
          tileSource: {type: 'image', url: base + 'heatmap/' + encodeURIComponent(model) + '.png', buildPyramid: false},
          x: 0, y: 0, width: info.map_width * info.downsample / size.x, opacity: opacity('heatmap'),
          preload: true,   // hidden (opacity 0) it still follows the view, so switching it on shows it
          success: function (ev) { state.heatmapItem = ev.item; resolve(); },
          error: function () { status('heatmap failed'); resolve(); }
        });
      });
    }));
    return Promise.all(jobs);
  }

  function legend(d) {
    $('legend').innerHTML = d.classes.map(function (c, i) {
      return '<span class="swatch" style="background:rgb(' + d.colours[i].join(',') + ')"></span>' + c;
    }).join('');
  }

  function draw() {
    var w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.clearRect(0, 0, w, h);
    var item = viewer.world.getItemAt(0);
    if (!item || !state.current) return;
    var p0 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var p1 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(10000, 10000));
    var sx = (p1.x - p0.x) / 10000, sy = (p1.y - p0.y) / 10000;
    canvas.dataset.transform = [p0.x, p0.y, sx, sy].join(',');   // image px -> element px
    function rings(list, stroke, fill, alpha) {
      if (!list || !alpha) return;
      ctx.globalAlpha = alpha; ctx.lineWidth = 2; ctx.strokeStyle = stroke; ctx.fillStyle = fill;
      list.forEach(function (ring) {
        ctx.beginPath();
        ring.forEach(function (p, i) {
          var x = p0.x + p[0] * sx, y = p0.y + p[1] * sy;
          if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        });
        ctx.closePath();
        if (fill) ctx.fill();
        ctx.stroke();
      });
    }
    rings(state.layers.tissue, 'rgb(0,150,0)', null, opacity('tissue'));
    rings(state.layers.lesion, 'rgb(0,90,255)', 'rgb(0,200,255)', opacity('lesion'));
    var det = state.layers.detections, a = opacity('detections');
    if (det && a) {
      ctx.globalAlpha = a;
      var r = Math.max(3, Math.min(10, 6 * Math.sqrt(sx)));
      det.points.forEach(function (p) {
        ctx.fillStyle = 'rgb(' + det.colours[p[2]].join(',') + ')';
        ctx.beginPath(); ctx.arc(p0.x + p[0] * sx, p0.y + p[1] * sy, r, 0, 2 * Math.PI); ctx.fill();
      });
    }
    ctx.globalAlpha = 1;
  }

  function applyView(params) {
    var item = viewer.world.getItemAt(0);
    if (!item || !params.zoom) return;
    var size = item.getContentSize();
    var cx = params.cx !== undefined ? +params.cx : size.x / 2, cy = params.cy !== undefined ? +params.cy : size.y / 2;
    viewer.viewport.zoomTo(+params.zoom, null, true);
    viewer.viewport.panTo(item.imageToViewportCoordinates(cx, cy), true);
  }

  // For scripts driving the page (the browser test): the viewer, and a promise for "every shown
  // layer's tiles are drawn", two frames after the last change.
  state.viewer = viewer;
  state.settled = function () {
    return new Promise(function (resolve) {
      requestAnimationFrame(function () { requestAnimationFrame(function () { whenLoaded(function () {
        requestAnimationFrame(function () { draw(); resolve(true); });
      }); }); });
    });
  };
  state.show = function (name, on) {
    $('on-' + name).checked = on;
    $('on-' + name).dispatchEvent(new Event('input'));
    return state.settled();
  };

  function whenLoaded(done) {
    var tick = function () {
      var n = viewer.world.getItemCount(), all = n > 0;
      for (var i = 0; i < n; i++) {
        var it = viewer.world.getItemAt(i);
        all = all && it.getFullyLoaded();
      }
      if (all) done(); else setTimeout(tick, 50);
    };
    tick();
  }

  viewer.addHandler('open', function () {
    var slide = state.current, params = hashParams();
    ['heatmap', 'tissue', 'lesion', 'detections'].forEach(function (k) {
      if (params['op-' + k] !== undefined) $('op-' + k).value = params['op-' + k];
      if (params.layers !== undefined) $('on-' + k).checked = params.layers.split(',').indexOf(k) >= 0;
    });
    applyView(params);
    loadLayers(slide).then(function () {
      applyView(params);
      draw();
      whenLoaded(function () {
        draw();
        state.ready = true;
        document.body.dataset.ready = '1';
        status(slide.slide_id + (slide.label ? ' (' + slide.label + ')' : ''));
      });
    }).catch(function (err) { status(String(err)); });
  });
  viewer.addHandler('open-failed', function (ev) { status('cannot open slide: ' + ev.message); });
  viewer.addHandler('update-viewport', draw);
  viewer.addHandler('resize', draw);
  ['tissue', 'lesion', 'detections', 'heatmap'].forEach(function (k) {
    ['on-', 'op-'].forEach(function (p) {
      $(p + k).addEventListener('input', function () {
        if (state.heatmapItem) state.heatmapItem.setOpacity(opacity('heatmap'));
        draw();
      });
    });
  });
  ['heatmap-model', 'detection-model'].forEach(function (id) {
    $(id).addEventListener('change', function () { if (state.current) viewer.open(viewer.world.getItemAt(0).source); });
  });
  window.addEventListener('hashchange', function () {
    var id = hashParams().slide;
    if (id && (!state.current || state.current.slide_id !== id)) openSlide(id);
  });

  getJSON('/api/slides').then(function (data) {
    state.slides = data.slides;
    $('run').textContent = data.run;
    fillTable();
    var id = hashParams().slide || (state.slides[0] && state.slides[0].slide_id);
    if (id) openSlide(id);
  }).catch(function (err) { status(String(err)); });
})();
