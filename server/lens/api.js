// The lens's only way to the server: its public HTTP API, with the API key when the server has one.
// Paths are relative ("v1/…"), so the page also works behind a proxy that serves memdec under a prefix.

const KEY_ITEM = "memdec.apiKey"; // sessionStorage: kept for this tab, gone when it closes

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

/** An error answer of the API: `message` is the server's own text. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
    this.param = error?.param ?? null;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = storedKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  return new ApiError(response.status, body?.error);
}

/** GET or POST a JSON endpoint; resolves to the parsed answer, rejects with ApiError. */
export async function call(path, body = null, signal = undefined) {
  const response = await fetch(path, {
    method: body === null ? "GET" : "POST",
    headers: headers(),
    body: body === null ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** POST a streaming completion; calls onEvent(chunk) for each server-sent event until [DONE]. */
export async function stream(path, body, onEvent, signal = undefined) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!frame.startsWith("data: ")) continue;
      const data = frame.slice(6);
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(500, event.error); // an error frame mid-stream
      onEvent(event);
    }
  }
}
