// Builds the prebuilt extension into jupyterlab.outputDir (the Python package) with @jupyter/builder
// and the core package metadata from @jupyterlab/core-meta, both from node_modules: no Python and
// no download beyond `npm ci`. Pass --development for an unminified build with source maps.
'use strict';
const { execFileSync } = require('child_process');
const path = require('path');

const root = path.resolve(__dirname, '..');
const builder = require.resolve('@jupyter/builder/lib/build-labextension.js', { paths: [root] });
const core = require.resolve('@jupyterlab/core-meta/core.package.json', { paths: [root] });
const args = [builder, '--core-package-file', core, ...process.argv.slice(2), root];
execFileSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
