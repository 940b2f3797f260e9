// Runs calls of @huggingface/inference's InferenceClient against pipeq serve's /models/{m}
// routes; tests/test_serve_hf.py drives it. Reads [{fn, url, args}] as JSON on stdin;
// prints [{result} | {error, status}] as JSON on stdout, one outcome per call.
import { InferenceClient } from "@huggingface/inference";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const calls = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const key = process.env.PIPEQ_KEY ?? "";

const outcomes = [];
for (const { fn, url, args } of calls) {
  const client = new InferenceClient(key).endpoint(url);
  try {
    outcomes.push({ result: await client[fn](args, { retry_on_error: false }) });
  } catch (e) {
    outcomes.push({ error: String(e.message), status: e.httpResponse?.status ?? null });
  }
}
process.stdout.write(JSON.stringify(outcomes));
