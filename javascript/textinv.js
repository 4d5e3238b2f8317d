// textinv tab: the web UI's own progress bar (requestProgress, as its Train tab uses) plus a live
// loss chart and the latest preview from /textinv/v1/status.

function textinvChart(losses, evals) {
    var chart = gradioApp().getElementById('textinv_chart');
    if (!chart) return;
    if (!losses || losses.length < 2) {
        chart.innerHTML = '';
        return;
    }
    var w = 480, h = 160, pad = 28;
    var all = losses.concat(evals.map(function(e) { return e[1]; }));
    var lo = Math.min.apply(null, all), hi = Math.max.apply(null, all);
    if (hi - lo < 1e-9) { hi = lo + 1e-9; }
    var n = losses.length;
    function x(i) { return pad + (w - 2 * pad) * i / Math.max(1, n - 1); }
    function y(v) { return h - pad - (h - 2 * pad) * (v - lo) / (hi - lo); }
    var train = losses.map(function(v, i) { return x(i) + ',' + y(v); }).join(' ');
    var evalPts = evals.map(function(e) { return x(Math.max(0, e[0] - 1)) + ',' + y(e[1]); }).join(' ');
    chart.innerHTML =
        '<svg class="textinv-loss" viewBox="0 0 ' + w + ' ' + h + '" width="100%">' +
        '<text x="' + pad + '" y="14">loss (train: thin, evaluation: thick)</text>' +
        '<text x="2" y="' + (pad + 4) + '">' + hi.toFixed(3) + '</text>' +
        '<text x="2" y="' + (h - pad + 4) + '">' + lo.toFixed(3) + '</text>' +
        '<polyline class="textinv-train" fill="none" points="' + train + '"/>' +
        '<polyline class="textinv-eval" fill="none" points="' + evalPts + '"/>' +
        '<text x="' + (w - pad - 70) + '" y="' + (h - 6) + '">step ' + n + '</text></svg>';
}

function textinvPoll() {
    fetch('./textinv/v1/status').then(function(r) { return r.json(); }).then(function(status) {
        var job = status.job;
        if (!job) return;
        textinvChart(job.losses, job.evals);
        if (job.preview) {
            var chart = gradioApp().getElementById('textinv_chart');
            var img = chart && chart.querySelector('img.textinv-preview');
            if (chart && !img) {
                img = document.createElement('img');
                img.className = 'textinv-preview';
                chart.appendChild(img);
            }
            if (img) {
                img.src = 'data:image/png;base64,' + job.preview;
                img.title = 'preview at step ' + job.preview_step;
            }
        }
    }).catch(function() {});
}

function textinv_start() {
    var id = randomId();
    var timer = setInterval(textinvPoll, 1000);
    requestProgress(id, gradioApp().getElementById('textinv_progress'), gradioApp().getElementById('textinv_gallery'), function() {
        clearInterval(timer);
        textinvPoll();
    }, function(progress) {
        var box = gradioApp().getElementById('textinv_output');
        if (box && progress.textinfo) box.innerHTML = progress.textinfo;
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
