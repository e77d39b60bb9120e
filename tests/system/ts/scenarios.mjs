// Runs one scenario against the gateway with the official TypeScript SDK and prints the
// outcome as one JSON line. Usage: node scenarios.mjs <baseURL> <scenario>
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, scenario] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey: "test-key", maxRetries: 0 });
const user = (text) => ({ role: "user", content: text });
const weather = {
  name: "get_weather",
  description: "Current weather for a city.",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};

const scenarios = {
  async create() {
    return client.messages.create({ model: "claude-haiku-4-5", max_tokens: 64, messages: [user("hi")] });
  },
  async stream() {
    const stream = client.messages.stream({
      model: "claude-haiku-4-5",
      max_tokens: 64,
      messages: [user("hi")],
    });
    const events = [];
    stream.on("streamEvent", (event) => events.push(event.type));
    const message = await stream.finalMessage();
    return { message, events };
  },
  async tool_loop() {
    const messages = [user("Weather in Oslo?")];
    const first = await client.messages
      .stream({ model: "claude-haiku-4-5", max_tokens: 100, messages, tools: [weather] })
      .finalMessage();
    const call = first.content.find((block) => block.type === "tool_use");
    messages.push({ role: "assistant", content: first.content });
    messages.push({
      role: "user",
      content: [{ type: "tool_result", tool_use_id: call.id, content: `3°C in ${call.input.city}` }],
    });
    const second = await client.messages
      .stream({ model: "claude-haiku-4-5", max_tokens: 100, messages, tools: [weather] })
      .finalMessage();
    return { first, second };
  },
  async parallel_thinking() {
    const time = {
      name: "get_time",
      description: "Current time in a time zone.",
      input_schema: { type: "object", properties: { tz: { type: "string" } }, required: ["tz"] },
    };
    const stream = client.messages.stream({
      model: "claude-haiku-4-5",
      max_tokens: 2048,
      thinking: { type: "enabled", budget_tokens: 1024 },
      messages: [user("Weather and time in Oslo?")],
      tools: [weather, time],
    });
    const deltas = [];
    stream.on("streamEvent", (event) => {
      if (event.type === "content_block_delta") deltas.push(event.delta.type);
    });
    return { message: await stream.finalMessage(), deltas };
  },
  async image() {
    const png = Buffer.from("89504e470d0a1a0a", "hex").toString("base64");
    return client.messages.create({
      model: "claude-haiku-4-5",
      max_tokens: 64,
      messages: [
        {
          role: "user",
          content: [
            { type: "image", source: { type: "base64", media_type: "image/png", data: png } },
            { type: "text", text: "What is this?" },
          ],
        },
      ],
    });
  },
  async batch() {
    const params = (text) => ({ model: "claude-haiku-4-5", max_tokens: 16, messages: [user(text)] });
    const created = await client.messages.batches.create({
      requests: [
        { custom_id: "first", params: params("one") },
        { custom_id: "second", params: params("two") },
        { custom_id: "broken", params: { model: "claude-haiku-4-5", messages: [] } },
      ],
    });
    let batch = created;
    for (let i = 0; i < 600 && batch.processing_status !== "ended"; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      batch = await client.messages.batches.retrieve(created.id);
    }
    const results = [];
    for await (const line of await client.messages.batches.results(created.id)) results.push(line);
    const listed = [];
    for await (const item of client.messages.batches.list({ limit: 1 })) listed.push(item.id);
    const deleted = await client.messages.batches.delete(created.id);
    return { created, batch, results, listed, deleted };
  },
  async error() {
    try {
      await client.messages.create({ model: "claude-haiku-4-5", max_tokens: 64, messages: [user("hi")] });
      return { error: null };
    } catch (err) {
      return { error: err.constructor.name, status: err.status, type: err.error?.error?.type };
    }
  },
};

const result = await scenarios[scenario]();
process.stdout.write(JSON.stringify(result) + "\n");
