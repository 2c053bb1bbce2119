// Render the site's math with the KaTeX shipped in assets/katex (no network):
// - pages and API docstrings: pymdownx.arithmatex (generic mode) wraps each $...$ / $$...$$ in a
//   span.arithmatex / div.arithmatex holding \(...\) / \[...\];
// - notebook pages: nbconvert keeps the $...$ / $$...$$ of Markdown cells as they are.
// A formula KaTeX cannot parse is shown in red with the error as its tooltip (class katex-error),
// which tests/test_docs_site.py's browser check looks for.
(function () {
  "use strict";
  var options = { throwOnError: false };

  function renderArithmatex(el) {
    var tex = el.textContent.trim();
    var display = el.tagName === "DIV";
    if (/^\\[([]/.test(tex) && /\\[)\]]$/.test(tex)) {
      tex = tex.slice(2, -2);
    }
    katex.render(tex, el, Object.assign({ displayMode: display }, options));
  }

  function render(root) {
    root.querySelectorAll(".arithmatex").forEach(renderArithmatex);
    root.querySelectorAll(".jupyter-wrapper .jp-RenderedMarkdown").forEach(function (el) {
      renderMathInElement(el, Object.assign({
        delimiters: [
          { left: "$$", right: "$$", display: true },
          { left: "$", right: "$", display: false },
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true }
        ]
      }, options));
    });
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { render(document); }); // Material, instant loading or not
  } else {
    document.addEventListener("DOMContentLoaded", function () { render(document); });
  }
})();
