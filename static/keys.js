// Keyboard shortcuts: j / → next feature, k / ← previous, / focuses the search box.
// Next/previous come from the page's <link rel="next|prev">; nothing fires while typing.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target.closest && target.closest("input, textarea, select, [contenteditable]")) {
    if (event.key === "Escape") target.blur();
    return;
  }
  const go = (rel) => {
    const link = document.querySelector(`link[rel="${rel}"]`);
    if (link) window.location.href = link.href;
  };
  if (event.key === "j" || event.key === "ArrowRight") go("next");
  else if (event.key === "k" || event.key === "ArrowLeft") go("prev");
  else if (event.key === "/") {
    const search = document.querySelector("[data-search]");
    if (search) { event.preventDefault(); search.focus(); search.select(); }
  }
});
