// Follows one workflow instance through events.php (Server-Sent Events relayed from jobd) and draws it: a row per
// task, the instance's progress bar, its status, and a list of the events received.
'use strict';

(function () {
  const section = document.getElementById('instance');
  const instanceId = section.dataset.instance;
  const status = document.getElementById('status');
  const bar = document.getElementById('bar');
  const percent = document.getElementById('percent');
  const steps = document.getElementById('steps');
  const log = document.getElementById('events');

  function cell(row, name, text) {
    const td = row.querySelector('.' + name) || row.appendChild(document.createElement('td'));
    td.className = name;
    td.textContent = text;
    return td;
  }

  // One row per task; a task not reached yet (evqid 0) has no number, so it is drawn "waiting".
  function drawTask(row, task) {
    row.dataset.evqid = String(task.evqid);
    row.dataset.status = task.status || 'WAITING';
    cell(row, 'name', task.name);
    cell(row, 'status', task.status || 'waiting');
    const progress = cell(row, 'progression', '');
    const meter = document.createElement('progress');
    meter.max = 100;
    meter.value = task.progression;
    progress.append(meter, ' ' + task.progression + '%');
    row.dataset.progression = String(task.progression);
    cell(row, 'retval', task.retval === null ? '' : String(task.retval));
  }

  function tasksOf(jobs) {
    return jobs.flatMap((job) => [...job.tasks, ...tasksOf(job.subjobs)]);
  }

  function setProgress(value) {
    bar.value = value;
    percent.textContent = value + '%';
    section.dataset.progress = String(value);
  }

  function setStatus(instance) {
    status.dataset.status = instance.status;
    status.textContent = instance.status === 'TERMINATED'
      ? (instance.errors === 0 ? 'finished' : 'finished with ' + instance.errors + ' error(s)')
      : 'running';
    section.dataset.errors = String(instance.errors);
  }

  function note(text) {
    const item = document.createElement('li');
    item.textContent = text;
    log.append(item);
  }

  const source = new EventSource('events.php?instance=' + encodeURIComponent(instanceId));

  function finish(instance) {
    setStatus(instance);
    setProgress(100);
    source.close();  // or EventSource would reconnect for ever
    section.dataset.finished = 'yes';
  }

  function drawTasks(instance) {
    steps.replaceChildren(...tasksOf(instance.jobs).map((task) => {
      const row = document.createElement('tr');
      drawTask(row, task);
      return row;
    }));
  }

  source.addEventListener('snapshot', (event) => {
    const instance = JSON.parse(event.data);
    drawTasks(instance);
    note('snapshot: ' + instance.status);
    if (instance.status === 'TERMINATED') {
      finish(instance);
    } else {
      setStatus(instance);
    }
  });

  // Tasks numbered since the snapshot: their rows. The tree is read after the events before it, and may be newer
  // than those after it: the instance's status and its end come with these, in order.
  source.addEventListener('tasks', (event) => {
    drawTasks(JSON.parse(event.data));
  });

  source.addEventListener('instance.progress', (event) => {
    const data = JSON.parse(event.data);
    const task = data.task;
    const row = steps.querySelector('tr[data-evqid="' + task.evqid + '"]');
    if (row) {  // otherwise a new task: a snapshot with it follows
      drawTask(row, task);
    }
    setProgress(data.progress);
    note('#' + event.lastEventId + ' ' + task.name + ': ' + task.status + ' ' + task.progression + '%');
  });

  source.addEventListener('instance.state', (event) => {
    const data = JSON.parse(event.data);
    note('#' + event.lastEventId + ' instance ' + data.instance.status);
    if (data.instance.status === 'TERMINATED') {
      finish(data.instance);
    } else {
      setStatus(data.instance);
      setProgress(data.progress);
    }
  });

  source.addEventListener('failure', (event) => {
    status.textContent = 'jobd is not reachable (' + JSON.parse(event.data) + '); retrying…';
  });

  source.onerror = () => {
    if (section.dataset.finished !== 'yes') {
      status.textContent = 'reconnecting…';
    }
  };
})();
