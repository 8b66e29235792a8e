// Label edit form (templates/_partials/label_edit.html): send the write token typed in the form
// as an Authorization header rather than a form field, and show the server's answer in place
// even when it refuses the edit (401, 403, 422), which htmx would otherwise drop.
const labelForm = (elt) => (elt && elt.closest ? elt.closest("form[data-bearer-token]") : null);

document.addEventListener("htmx:configRequest", (event) => {
  const form = labelForm(event.detail.elt);
  if (!form) return;
  const token = form.querySelector("input[name=token]").value;
  delete event.detail.parameters["token"];
  event.detail.headers["Authorization"] = "Bearer " + token;
});

document.addEventListener("htmx:beforeSwap", (event) => {
  // detail.elt is the swap target here; the form that sent the request is requestConfig.elt.
  const form = labelForm(event.detail.requestConfig && event.detail.requestConfig.elt);
  if (form && event.detail.xhr.status < 500) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
