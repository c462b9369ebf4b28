"use strict";
// An offline reader of the service's OpenAPI document (FastAPI's own /docs page loads
// Swagger UI from a CDN, which an offline service cannot reach).

const KEY_STORE = "nxtrec-api-key";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function schemaText(schema) {
  if (!schema) return "";
  if (schema.anyOf) return schema.anyOf.map(schemaText).filter((t) => t !== "null").join(" | ");
  const bounds = ["minimum", "maximum"].filter((b) => b in schema).map((b) => `${b} ${schema[b]}`);
  return [schema.type || "object", ...bounds].join(", ");
}

function operation(path, method, op) {
  const box = element("section", "result op");
  box.append(element("h2", "name", `${method.toUpperCase()} ${path}`));
  box.append(element("p", "muted", op.summary || ""));
  const params = op.parameters || [];
  if (params.length) {
    const list = element("ul");
    for (const p of params) {
      list.append(element("li", "", `${p.name} (${p.in}, ${schemaText(p.schema)}): ${p.description || ""}`));
    }
    box.append(element("h3", "", "Parameters"), list);
  }
  if (op.requestBody) {
    box.append(element("h3", "", "Body"), element("p", "", Object.keys(op.requestBody.content).join(", ")));
  }
  const answers = element("ul");
  for (const [code, r] of Object.entries(op.responses || {})) answers.append(element("li", "", `${code}: ${r.description}`));
  box.append(element("h3", "", "Responses"), answers);
  return box;
}

async function load() {
  const key = sessionStorage.getItem(KEY_STORE);
  const res = await fetch("/openapi.json", { headers: key ? { Authorization: "Bearer " + key } : {} });
  if (!res.ok) {
    document.getElementById("status").textContent = res.status === 401
      ? "This server needs an API key: enter it on the main page first." : `HTTP ${res.status}`;
    return;
  }
  const spec = await res.json();
  const target = document.getElementById("operations");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) target.append(operation(path, method, op));
  }
}

load();
